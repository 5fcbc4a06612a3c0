"""Token data that scales: text files pre-tokenised once into flat token arrays on disk, read
back as windows through ``np.memmap`` — start-up memory does not grow with the corpus.

  python -m gptjax.data.tokens FILES... --tokenizer TOK --out DIR [--validation-fraction 0.1]

``DIR`` holds ``train.tokens`` / ``validation.tokens`` (raw little-endian uint16, or uint32
for vocabularies over 65,536), ``tokenizer/`` (a copy of the tokenizer used), ``meta.json``
(dtype, token counts, tokenizer size and special ids) and, while running, ``progress.json``:
pre-tokenisation is resumable — after an interruption the same command truncates each split
to the last file it recorded as complete and goes on from the next file.

Documents (whole files, or split on ``document_separator``) are joined by the tokenizer's
end-of-text id, between documents only. Splits as the ``text_files`` builder: ``tail`` (the
last ``validation_fraction`` of every document's characters) or ``documents`` (by a hash of
the document's index, streamed: no guarantee that a split is non-empty).

Training reads ``data.name='tokens'`` with ``data.paths=(DIR,)``; ``builder_kwargs.windows``
picks the windows: ``fixed`` (non-overlapping, shuffled each epoch) or ``random`` (every start
offset once per epoch, shuffled: nanoGPT's random offsets, without replacement). Both are
plain random-access sources, so grain shuffles, shards them over processes and checkpoints
the iterator position like any other data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from gptjax.data.builders.text_files.text_files import SPLIT_MODES, resolve_paths, split_documents
from gptjax.data.tokenizers import load_tokenizer, make_tokenizer, save_tokenizer

FORMAT = 1
META, PROGRESS, TOKENIZER_DIR = "meta.json", "progress.json", "tokenizer"
SPLITS = ("train", "validation")
WINDOWS = ("fixed", "random")


def _dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _in_validation(doc_index: int, fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(str(doc_index).encode()).digest()[:8], "big") / 2.0**64
  return h < fraction


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)  # atomic: a crash leaves the old record or the new one


def pretokenize(paths, out_dir: str, tokenizer="byte", *, validation_fraction: float = 0.1,
                split_mode: str = "tail", document_separator: str = "",
                progress: bool = True, _stop_after_files: int | None = None) -> dict:
  """Tokenise the files named by ``paths`` into ``out_dir`` (resumable); returns the meta.

  ``tokenizer``: a tokenizer object, or a name / path for ``make_tokenizer``.
  """
  if split_mode not in SPLIT_MODES:
    raise ValueError(f"split_mode={split_mode!r} is invalid: allowed values are {SPLIT_MODES}")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction!r} is invalid: must be in [0, 1)")
  tok = make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
  files = resolve_paths(paths)
  os.makedirs(out_dir, exist_ok=True)
  dtype = _dtype(tok.vocab_size)
  job = dict(files=list(files), validation_fraction=validation_fraction, split_mode=split_mode,
             document_separator=document_separator, vocab_size=tok.vocab_size,
             eos_id=tok.eos_id, dtype=dtype.str)
  prog_path = os.path.join(out_dir, PROGRESS)
  state = dict(job=job, files_done=0, tokens={s: 0 for s in SPLITS}, docs=0)
  if os.path.exists(prog_path):
    with open(prog_path) as f:
      saved = json.load(f)
    if saved["job"] != job:
      raise ValueError(f"{out_dir} holds an unfinished pre-tokenisation of other files or "
                       f"options: remove {prog_path} (and the *.tokens files) to start over")
    state = saved
  elif os.path.exists(os.path.join(out_dir, META)):
    with open(os.path.join(out_dir, META)) as f:
      return json.load(f)  # already complete
  save_tokenizer(tok, os.path.join(out_dir, TOKENIZER_DIR))
  outs = {}
  for s in SPLITS:
    path = os.path.join(out_dir, f"{s}.tokens")
    mode = "r+b" if os.path.exists(path) else "w+b"
    f = open(path, mode)
    f.truncate(state["tokens"][s] * dtype.itemsize)  # drop a half-written file's tokens
    f.seek(0, os.SEEK_END)
    outs[s] = f
  bar = tqdm(total=len(files), initial=state["files_done"], desc="tokenize", unit="file",
             disable=not progress)
  try:
    for n, path in enumerate(files[state["files_done"]:], start=state["files_done"]):
      with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
      for doc in split_documents(text, document_separator):
        if split_mode == "tail":
          k = len(doc) - int(round(len(doc) * validation_fraction))
          parts = {"train": doc[:k], "validation": doc[k:]}
        else:
          parts = {("validation" if _in_validation(state["docs"], validation_fraction)
                    else "train"): doc}
        state["docs"] += 1
        for s, piece in parts.items():
          if not piece:
            continue
          ids = tok.encode(piece)
          if state["tokens"][s]:
            ids = [tok.eos_id] + ids  # end-of-text between documents only
          outs[s].write(np.asarray(ids, dtype).tobytes())
          state["tokens"][s] += len(ids)
      for f in outs.values():
        f.flush()
        os.fsync(f.fileno())
      state["files_done"] = n + 1
      _write_json(prog_path, state)
      bar.update(1)
      if _stop_after_files is not None and state["files_done"] >= _stop_after_files:
        raise KeyboardInterrupt("stopped on purpose (test hook)")
  finally:
    bar.close()
    for f in outs.values():
      f.close()
  meta = dict(format=FORMAT, dtype=dtype.str, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
              tokens=state["tokens"], documents=state["docs"], files=len(files),
              split_mode=split_mode, validation_fraction=validation_fraction)
  _write_json(os.path.join(out_dir, META), meta)
  os.remove(prog_path)
  return meta


class TokenFile:
  """One split of a pre-tokenised directory, memory-mapped; ``windows(seq_len)`` gives the
  random-access source of (seq_len + 1)-token windows the ``lm`` pipeline reads."""

  def __init__(self, directory: str, split: str, windows: str = "fixed"):
    meta_path = os.path.join(directory, META)
    if not os.path.exists(meta_path):
      hint = (" (pre-tokenisation is unfinished: rerun it)" if
              os.path.exists(os.path.join(directory, PROGRESS)) else "")
      raise ValueError(f"{directory!r} is not a pre-tokenised directory: no {META}{hint}. "
                       "Make one with: python -m gptjax.data.tokens FILES --tokenizer TOK "
                       f"--out {directory}")
    if windows not in WINDOWS:
      raise ValueError(f"config.data.builder_kwargs.windows={windows!r} is invalid: allowed "
                       f"values are {WINDOWS}")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if split not in SPLITS or not self.meta["tokens"].get(split):
      raise ValueError(f"split {split!r} of {directory!r} is empty or unknown (tokens: "
                       f"{self.meta['tokens']})")
    self.directory, self.split, self.mode = directory, split, windows
    self.tokens = np.memmap(os.path.join(directory, f"{split}.tokens"),
                            dtype=np.dtype(self.meta["dtype"]), mode="r")

  def tokenizer(self):
    return load_tokenizer(os.path.join(self.directory, TOKENIZER_DIR))

  def check_tokenizer(self, tok, field: str = "config.data.tokenizer") -> None:
    if tok.vocab_size != self.meta["vocab_size"] or tok.eos_id != self.meta["eos_id"]:
      raise ValueError(
          f"{field} (vocab_size={tok.vocab_size}, eos_id={tok.eos_id}) is not the tokenizer "
          f"{self.directory!r} was made with (vocab_size={self.meta['vocab_size']}, eos_id="
          f"{self.meta['eos_id']}): set {field}='{os.path.join(self.directory, TOKENIZER_DIR)}'")

  def windows(self, seq_len: int) -> "TokenWindows":
    return TokenWindows(self, seq_len)

  def __len__(self) -> int:
    return len(self.tokens)


class TokenWindows:
  """(seq_len + 1)-token windows of a ``TokenFile``: ``fixed`` = non-overlapping,
  ``random`` = one per start offset. Reads touch only the pages of the windows read."""

  def __init__(self, source: TokenFile, seq_len: int):
    self.source, self.seq_len = source, seq_len
    n = len(source.tokens)
    if n < seq_len + 1:
      raise ValueError(f"split {source.split!r} has {n} tokens, fewer than data.seq_len + 1 = "
                       f"{seq_len + 1}: lower data.seq_len or add text")
    self._len = (n - 1) // seq_len if source.mode == "fixed" else n - seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    start = i * self.seq_len if self.source.mode == "fixed" else i
    return np.asarray(self.source.tokens[start:start + self.seq_len + 1], np.int32)

  def __repr__(self) -> str:  # stable: grain compares it when restoring an iterator
    return (f"TokenWindows({self.source.directory!r}, {self.source.split!r}, "
            f"{self.source.mode!r}, seq_len={self.seq_len})")


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m gptjax.data.tokens",
                               description="Pre-tokenise text files once (resumable).")
  ap.add_argument("files", nargs="+", help="text files, globs or directories")
  ap.add_argument("--tokenizer", default="byte", help="'byte', 'shapes' or a tokenizer path")
  ap.add_argument("--out", required=True)
  ap.add_argument("--validation-fraction", type=float, default=0.1)
  ap.add_argument("--split-mode", choices=SPLIT_MODES, default="tail")
  ap.add_argument("--document-separator", default="")
  args = ap.parse_args(argv)
  meta = pretokenize(args.files, args.out, args.tokenizer,
                     validation_fraction=args.validation_fraction, split_mode=args.split_mode,
                     document_separator=args.document_separator)
  print(f"{args.out}: {meta['tokens']} tokens from {meta['files']} files "
        f"({meta['documents']} documents), {meta['dtype']}")


if __name__ == "__main__":
  main()
