"""Fine-tuning imported GPT-2 weights (``config.init_from``) on the 8-device test mesh with
FSDP: the first step's loss is the Hugging Face model's own loss on that batch (so the
weights really arrived, resharded), and training lowers the loss."""
import json

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _train_helpers import train_rows  # noqa: E402
from gptjax.runs import base_config, train  # noqa: E402
from gptjax.train.config import model_section  # noqa: E402
from gptjax.train.data import load_split, pipeline_for  # noqa: E402

SHERLOCK_HEAD = 20_000  # characters of the public-domain text used here


def _hf_dir(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=264, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=258, eos_token_id=258)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  path = str(tmp_path / "hf")
  model.save_pretrained(path)
  return model, path


def _config(tmp_path, init_from):
  import os
  text = open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "sherlock.txt"), encoding="utf-8").read()[:SHERLOCK_HEAD]
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "sherlock.txt").write_text(text, encoding="utf-8")
  c = base_config()
  c.init_from = init_from
  c.model = model_section("gpt2-small", vocab_size=264, max_seq_len=64, width=32, depth=2,
                          num_heads=4, num_kv_heads=4, mlp_dim=128)
  c.data.name, c.data.task, c.data.tokenizer, c.data.seq_len = "text_files", "lm", "byte", 64
  c.data.paths = (str(tmp_path / "text"),)
  c.data.builder_kwargs = ml_collections.ConfigDict(
      dict(validation_fraction=0.1, split_mode="tail", document_separator=""))
  c.data.data_dir = str(tmp_path / "data")
  c.data.test_split = ""
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-3, 0, 0.0
  c.train.steps, c.train.batch_size, c.train.log_every = 8, 8, 1
  c.eval.every, c.eval.at_end = 0, False
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  return c


@pytest.mark.slow
def test_finetune_from_imported_gpt2_on_fsdp_mesh(tmp_path):
  hf, path = _hf_dir(tmp_path)
  c = _config(tmp_path, path)
  first = next(iter(pipeline_for(c, load_split(c, "train"), train=True, batch_size=8)))
  with torch.no_grad():
    logits = hf(torch.as_tensor(first["inputs"].astype(np.int64))).logits.double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.as_tensor(first["targets"].reshape(-1).astype(np.int64)),
                                           reduction="none").numpy()
  mask = first["loss_mask"].reshape(-1)
  hf_loss = float((ce * mask).sum() / mask.sum())
  train(c, str(tmp_path / "run"))
  rows = train_rows(tmp_path / "run")
  assert abs(rows[0]["loss"] - hf_loss) < 1e-4, (rows[0]["loss"], hf_loss)
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]


def test_init_from_must_match_the_model(tmp_path):
  _, path = _hf_dir(tmp_path)
  c = _config(tmp_path, path)
  c.model.width = 48
  c.model.head_dim = 12
  with pytest.raises(ValueError, match=r"config\.model\.width=48 \(checkpoint: 32\)"):
    train(c, str(tmp_path / "run"))
  c.model.width, c.model.head_dim = 32, 8
  c.init_from = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="config.init_from=.*missing.*existing directory"):
    train(c, str(tmp_path / "run2"))
