"""Real text end to end: training sees the user's bytes verbatim (blank lines, indentation,
trailing spaces), the end-of-text id only between documents, the run keeps its tokenizer,
and greedy sampling from the trained workdir writes the file back byte for byte."""
import ml_collections
import numpy as np
import pytest

from gptjax import sample as sample_lib
from gptjax.data.pipeline import _lm_windows
from gptjax.data.tokenizers import ByteTokenizer
from gptjax.runs import base_config, train
from gptjax.train.config import model_section
from gptjax.train.load import load_run_tokenizer

POEM = ("The rain, it falls\n\n"
        "    on roofs and walls;\n"
        "\tand drips  \n"
        "\n\n"
        "def f(x):\n    return x  # code, too\n")


def test_documents_are_joined_by_eos_only_between_them():
  tok = ByteTokenizer()
  src = [{"text": b"ab\n\n"}, {"text": b"  c"}, {"text": b"d"}]
  w = _lm_windows(src, tok, seq_len=9, text_key="text")  # one window of all 10 tokens
  flat = w.reshape(-1).tolist()
  assert flat == list(b"ab\n\n") + [tok.eos_id] + list(b"  c") + [tok.eos_id] + list(b"d")


@pytest.mark.slow
def test_memorised_file_is_sampled_back_byte_for_byte(tmp_path, capsys):
  files = tmp_path / "files"
  files.mkdir()
  for i in range(16):  # sixteen whole-file documents with the same text
    (files / f"poem{i:02d}.txt").write_text(POEM, encoding="utf-8")
  c = base_config()
  c.model = model_section("tiny", max_seq_len=128, width=64, num_heads=4, num_kv_heads=None,
                          mlp_dim=256, position="learned")
  c.data.name, c.data.task, c.data.tokenizer = "text_files", "lm", "byte"
  c.data.paths = (str(files),)
  c.data.builder_kwargs = ml_collections.ConfigDict(
      dict(validation_fraction=0.0, split_mode="tail", document_separator=""))
  c.data.data_dir = str(tmp_path / "data")
  c.data.seq_len = 128
  c.data.eval_split = c.data.test_split = ""
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 20, 0.0
  c.train.steps, c.train.batch_size, c.train.log_every = 200, 8, 50
  c.checkpoint.every = 1000
  c.eval.every, c.eval.at_end = 0, False
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  workdir = str(tmp_path / "run")
  out = train(c, workdir)
  assert out["train_loss"] < 0.05, out

  tok = load_run_tokenizer(workdir)
  assert isinstance(tok, ByteTokenizer)
  model, tok2 = sample_lib.load(workdir)
  prompt = POEM[:14]
  (text,) = sample_lib.sample(model, tok2, prompt, max_new_tokens=len(POEM) - 14 + 1,
                              temperature=0.0)
  assert prompt + text == POEM  # blank lines, tab, trailing spaces, indentation; then <eos>

  capsys.readouterr()  # drop what training printed
  sample_lib.main(["--workdir", workdir, "--prompt", prompt, "--temperature", "0",
                   "--max-new-tokens", str(len(POEM))])
  assert capsys.readouterr().out == POEM + "\n"
