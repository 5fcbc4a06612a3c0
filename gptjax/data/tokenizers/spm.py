"""SentencePiece ``.model`` files through the ``sentencepiece`` package, and training one on
your own files that keeps text verbatim.

Trained here with identity normalisation, no added dummy prefix, no whitespace collapsing
and byte fallback, so every string — newlines, blank lines, indentation, any Unicode —
round-trips exactly (SentencePiece's defaults NFKC-normalise and collapse whitespace, which
would change what a model can write). ``<sep>`` is a control symbol: text that spells
"<sep>" stays text; only the id is special. Special ids: ``pad`` / ``bos`` / ``eos`` from the
model (``<pad>``, ``<s>``, ``</s>`` ...), ``<sep>`` when present, else eos.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as sp

from gptjax.data.tokenizers.byte import text_ids

FILE = "tokenizer.model"


class SentencePieceTokenizer:
  """``encode`` / ``decode`` with the interface of ``ByteTokenizer``."""

  kind = "spm"

  def __init__(self, model_proto: bytes):
    self.proto = model_proto
    self.sp = sp.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id()
    self.bos_id = self.sp.bos_id()
    if self.eos_id < 0:
      raise ValueError("SentencePiece model has no eos piece (trained with eos_id=-1); "
                       "gptjax needs one to end documents and answers")
    self.bos_id = self.bos_id if self.bos_id >= 0 else self.eos_id
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
    sep = self.sp.piece_to_id("<sep>")
    self.sep_id = sep if sep != self.sp.unk_id() else self.eos_id
    self._specials = {self.eos_id, self.bos_id, self.pad_id, self.sep_id}

  @classmethod
  def from_file(cls, path: str) -> "SentencePieceTokenizer":
    """A ``.model`` file, or a directory holding ``tokenizer.model``."""
    if os.path.isdir(path):
      path = os.path.join(path, FILE)
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"SentencePieceTokenizer.encode expects str, got {type(text).__name__}")
    ids = self.sp.encode(text, out_type=int)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Iterable[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
    out = text_ids(ids, eos_id=self.eos_id, specials=self._specials,
                   vocab_size=self.vocab_size, stop_at_eos=stop_at_eos)
    return self.sp.decode(out)

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILE)
    with open(path, "wb") as f:
      f.write(self.proto)
    return path


def train(files: Sequence[str], vocab_size: int, *, model_type: str = "bpe") -> SentencePieceTokenizer:
  """A SentencePiece model (``model_type`` 'bpe' or 'unigram') of ``vocab_size`` pieces
  trained on ``files``, verbatim (see the module docstring)."""
  proto = io.BytesIO()
  sp.SentencePieceTrainer.train(
      input=list(files), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
      pad_id=0, bos_id=1, eos_id=2, unk_id=3, control_symbols=["<sep>"],
      byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
      allow_whitespace_only_pieces=True, max_sentence_length=1 << 20,
      train_extremely_large_corpus=False, minloglevel=2)
  return SentencePieceTokenizer(proto.getvalue())
