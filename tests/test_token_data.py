"""Pre-tokenised token data: resumable pre-tokenisation, lazy windows whose start-up memory
does not depend on the corpus size, disjoint shares per process, exact resume of the batch
stream, and the end-of-text id between documents only."""
import json
import os
import tracemalloc

import numpy as np
import pytest

from gptjax.data.datasets import load_source
from gptjax.data.pipeline import make_pipeline
from gptjax.data.tokenizers import ByteTokenizer
from gptjax.data.tokens import TokenFile, main, pretokenize

TOK = ByteTokenizer()


def _corpus(root, n_files=6, size=3000, seed=0):
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  words = ["the", "rain", "\n\n", "  indent", "café", "\t", "code()", "x"]
  for i in range(n_files):
    text = "".join(rng.choice(words) + " " for _ in range(size // 5))
    (root / f"f{i}.txt").write_text(text, encoding="utf-8")
  return sorted(str(p) for p in root.iterdir())


def _read(d, split):
  meta = json.load(open(os.path.join(d, "meta.json")))
  return np.fromfile(os.path.join(d, f"{split}.tokens"), dtype=np.dtype(meta["dtype"]))


def _synthetic(d, tokens, unique=False):
  """A pre-tokenised directory written directly: ids 0, 1, 2, ... (mod 256, or unique)."""
  d.mkdir(parents=True)
  ids = np.arange(tokens) if unique else np.arange(tokens) % 256
  ids.astype("<u2").tofile(d / "train.tokens")
  json.dump(dict(format=1, dtype="<u2", vocab_size=65536 if unique else 260, eos_id=258,
                 tokens={"train": tokens, "validation": 0}), open(d / "meta.json", "w"))


def test_tokens_are_the_documents_joined_by_eos(tmp_path):
  files = _corpus(tmp_path / "c", n_files=3)
  meta = pretokenize([str(tmp_path / "c")], str(tmp_path / "t"), "byte",
                     validation_fraction=0.1, progress=False)
  texts = [open(f, encoding="utf-8", newline="").read() for f in files]
  cut = [len(t) - round(0.1 * len(t)) for t in texts]
  want = {"train": [], "validation": []}
  for t, k in zip(texts, cut):
    for s, piece in (("train", t[:k]), ("validation", t[k:])):
      want[s] += ([TOK.eos_id] if want[s] else []) + TOK.encode(piece)
  for s in ("train", "validation"):
    np.testing.assert_array_equal(_read(str(tmp_path / "t"), s), want[s])
    assert meta["tokens"][s] == len(want[s])


def test_interrupted_pretokenisation_resumes_to_the_same_files(tmp_path):
  _corpus(tmp_path / "c")
  pretokenize([str(tmp_path / "c")], str(tmp_path / "straight"), "byte", progress=False)
  with pytest.raises(KeyboardInterrupt):
    pretokenize([str(tmp_path / "c")], str(tmp_path / "resumed"), "byte", progress=False,
                _stop_after_files=2)
  # A crash mid-file leaves tokens past the recorded count: they must be dropped.
  with open(tmp_path / "resumed" / "train.tokens", "ab") as f:
    f.write(b"\x07\x00" * 100)
  with pytest.raises(ValueError, match="unfinished"):
    TokenFile(str(tmp_path / "resumed"), "train")
  main([str(tmp_path / "c"), "--out", str(tmp_path / "resumed")])
  for s in ("train", "validation"):
    np.testing.assert_array_equal(_read(str(tmp_path / "resumed"), s),
                                  _read(str(tmp_path / "straight"), s))


@pytest.mark.parametrize("windows", ["fixed", "random"])
def test_two_processes_read_disjoint_windows(tmp_path, windows):
  _synthetic(tmp_path / "t", 5_000, unique=True)  # every window's content is unique
  src = load_source("tokens", "train", paths=[str(tmp_path / "t")], windows=windows)
  seq = 32
  n = len(src.windows(seq))
  seen = []
  for pi in range(2):
    p = make_pipeline(src, task="lm", batch_size=8, seq_len=seq, shuffle=True, repeat=False,
                      process_index=pi, process_count=2, seed=3)
    rows = [tuple(r) for b in p for r in b["inputs"]]
    seen.append(rows)
  sets = [set(rows) for rows in seen]
  assert all(len(st) == len(rows) for st, rows in zip(sets, seen))  # no window twice
  assert not sets[0] & sets[1]  # the two processes' shares are disjoint
  # Each process reads its share (every 2nd window of the shuffled order) in full batches of
  # batch_size / process_count = 4 rows.
  assert [len(r) for r in seen] == [(len(range(pi, n, 2)) // 4) * 4 for pi in range(2)]
  tokens = np.asarray(src.tokens)
  assert n == ((len(tokens) - 1) // seq if windows == "fixed" else len(tokens) - seq)


def test_resumed_pipeline_yields_the_same_batches(tmp_path):
  _corpus(tmp_path / "c")
  pretokenize([str(tmp_path / "c")], str(tmp_path / "t"), "byte", progress=False)
  src = load_source("tokens", "train", paths=[str(tmp_path / "t")], windows="random")
  make = lambda: make_pipeline(src, task="lm", batch_size=4, seq_len=16, seed=1)  # noqa: E731
  a = make()
  ref = [next(a)["inputs"] for _ in range(9)]
  b = make()
  for _ in range(4):
    next(b)
  state = b.iterator.get_state()
  c = make()
  c.iterator.set_state(state)
  got = [next(c)["inputs"] for _ in range(5)]
  for x, y in zip(ref[4:], got):
    np.testing.assert_array_equal(x, y)


def test_start_up_memory_does_not_grow_with_the_corpus(tmp_path):
  """Opening a split and reading batches allocates the same whatever the corpus size (the
  file is memory-mapped; only the windows read are paged in)."""
  def allocated(directory):
    tracemalloc.start()
    src = load_source("tokens", "train", paths=[directory])
    p = make_pipeline(src, task="lm", batch_size=8, seq_len=64, seed=0)
    for _ in range(3):
      next(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak

  # 0.1 MB vs 50 MB. The peaks themselves vary by a few MB from run to run (grain's prefetch
  # threads fill their buffers to a timing-dependent depth), so the corpus is made large
  # enough that loading it would dwarf that noise.
  for name, tokens in (("small", 50_000), ("large", 25_000_000)):
    _synthetic(tmp_path / name, tokens)
  small, large = allocated(str(tmp_path / "small")), allocated(str(tmp_path / "large"))
  assert large < small + 15_000_000, (small, large)  # a loaded corpus would add 50 MB


def test_wrong_tokenizer_is_named(tmp_path):
  _corpus(tmp_path / "c", n_files=2)
  pretokenize([str(tmp_path / "c")], str(tmp_path / "t"), "byte", progress=False)
  from gptjax.data.tokenizers import make_tokenizer
  src = TokenFile(str(tmp_path / "t"), "train")
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer.*tokenizer'"):
    src.check_tokenizer(make_tokenizer("shapes"))
  assert src.tokenizer().vocab_size == 260
