"""BPE and SentencePiece tokenizers against independent references: the pure-Python GPT-2
tokenizer of ``transformers`` (test extra) for byte-level BPE, and the ``sentencepiece``
processor itself; every string round-trips; saved tokenizers reload identically."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gptjax.data.tokenizers import (BPETokenizer, SentencePieceTokenizer, load_tokenizer,
                                    make_tokenizer, save_tokenizer, train)

SHERLOCK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "data", "sherlock.txt")
VARIED = [
    "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\nblank lines",
    "    def f(x):\n        return x  # indented code\n", "ünïcödé — “quotes” 漢字 🙂🙂",
    "numbers 1234567 and 3.14159", "MiXeD CaSe wOrDs", "a" * 50, "\u00a0non-breaking\u2003space",
    "", " ", "\n", "'s 're 've I'm", "x<sep>y <pad>",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The first 200 kB of the public-domain text, as a file."""
  text = open(SHERLOCK, encoding="utf-8").read()[:200_000]
  path = tmp_path_factory.mktemp("corpus") / "train.txt"
  path.write_text(text, encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def trained_bpe(corpus):
  return train("bpe", [corpus], 1000)


@pytest.fixture(scope="module")
def trained_spm(corpus):
  return train("spm", [corpus], 1000)


def test_bpe_matches_the_gpt2_reference_implementation(trained_bpe, tmp_path):
  """Our byte-level BPE == transformers' pure-Python GPT2Tokenizer on the same files."""
  transformers = pytest.importorskip("transformers")
  trained_bpe.tok.model.save(str(tmp_path))  # vocab.json + merges.txt
  ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  ours = BPETokenizer.from_vocab_merges(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  text = open(SHERLOCK, encoding="utf-8").read()[500_000:510_000]  # unseen text
  for s in VARIED + [text]:
    assert ours.encode(s) == ref.encode(s), s[:40]
    assert trained_bpe.encode(s) == ref.encode(s), s[:40]
  assert len(trained_bpe.encode(text)) < 0.45 * len(text.encode())  # it learned merges


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_every_string_round_trips(trained_bpe, trained_spm, s):
  for tok in (trained_bpe, trained_spm, make_tokenizer("byte"), make_tokenizer("shapes")):
    assert tok.decode(tok.encode(s)) == s


def test_sentencepiece_matches_the_processor_and_keeps_text_verbatim(trained_spm):
  import sentencepiece as sp
  proc = sp.SentencePieceProcessor(model_proto=trained_spm.proto)
  for s in VARIED:
    assert trained_spm.encode(s) == proc.encode(s, out_type=int)
    assert trained_spm.decode(trained_spm.encode(s)) == s  # whitespace and unicode verbatim
  assert (trained_spm.pad_id, trained_spm.bos_id, trained_spm.eos_id) == (0, 1, 2)
  assert proc.id_to_piece(trained_spm.sep_id) == "<sep>"


def test_specials_and_decode_stop(trained_bpe):
  t = trained_bpe
  ids = t.encode("one two", bos=True, eos=True)
  assert ids[0] == t.bos_id and ids[-1] == t.eos_id
  assert len({t.pad_id, t.bos_id, t.eos_id, t.sep_id}) == 4
  assert t.decode(ids + t.encode(" after")) == "one two"  # stops at <eos>
  assert t.decode(ids, stop_at_eos=False) == "one two"  # specials are not text


def test_saved_tokenizers_reload_identically(trained_bpe, trained_spm, tmp_path):
  for i, tok in enumerate((trained_bpe, trained_spm, make_tokenizer("shapes"))):
    d = str(tmp_path / f"t{i}")
    save_tokenizer(tok, d)
    back = load_tokenizer(d)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    for s in VARIED:
      assert back.encode(s) == tok.encode(s)
    assert make_tokenizer(d).encode("x y") == tok.encode("x y")  # data.tokenizer=<path>


def test_gpt2_vocabulary_uses_endoftext_for_every_special(trained_bpe, tmp_path):
  import json
  trained_bpe.tok.model.save(str(tmp_path))
  vocab = json.load(open(tmp_path / "vocab.json"))
  for name in ("<pad>", "<bos>", "<eos>", "<sep>"):
    vocab.pop(name)
  vocab["<|endoftext|>"] = max(vocab.values()) + 1
  json.dump(vocab, open(tmp_path / "vocab.json", "w"))
  gpt2 = load_tokenizer(str(tmp_path))
  eot = vocab["<|endoftext|>"]
  assert gpt2.eos_id == gpt2.bos_id == gpt2.pad_id == gpt2.sep_id == eot
  # Verbatim: text that spells a special token is text, not the special id.
  assert eot not in gpt2.encode("a<|endoftext|>b")
  assert gpt2.decode(gpt2.encode("a<|endoftext|>b")) == "a<|endoftext|>b"


def test_bad_names_and_sizes():
  with pytest.raises(ValueError, match="tokenizer 'nope' is invalid.*'byte', 'shapes'"):
    make_tokenizer("nope")
  with pytest.raises(ValueError, match="kind='wordpiece'"):
    train("wordpiece", [], 1000)
  with pytest.raises(ValueError, match="vocab_size=100"):
    train("bpe", [], 100)


def test_train_cli(corpus, tmp_path):
  out = tmp_path / "tok"
  proc = subprocess.run([sys.executable, "-m", "gptjax.data.tokenizers", "train", "--kind", "spm",
                         "--vocab", "600", corpus, "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "spm tokenizer, 600 ids" in proc.stdout
  tok = load_tokenizer(str(out))
  assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 600
  assert np.all(np.asarray(tok.encode("The adventure")) < 600)
