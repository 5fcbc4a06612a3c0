"""Byte-level tokenizer: 256 byte ids plus a few special tokens.

Every UTF-8 string round-trips and nothing needs downloading, which is what the built-in
datasets and tests want. Id layout: bytes 0..255 map to ids 0..255; the specials follow.
Every tokenizer (``bpe``, ``spm``) implements the same small interface: ``encode``,
``decode``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``sep_id``.

``WordTokenizer`` adds whole-word tokens from a fixed word list on top of the bytes (any
other text still falls back to bytes, so every string round-trips). For a closed-vocabulary
dataset such as ``shapes`` this cuts sequences ~4x, and a question's key word becomes one
token a small model attends to directly instead of a run of bytes it must first assemble.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

NUM_BYTES = 256
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")


def text_ids(ids, *, eos_id: int, specials, vocab_size: int, stop_at_eos: bool) -> list[int]:
  """The ids of ``ids`` that stand for text: up to the first ``eos_id`` (when
  ``stop_at_eos``), without special ids or ids past the vocabulary (a model may emit them)."""
  out = []
  for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
    i = int(i)
    if i == eos_id and stop_at_eos:
      break
    if i not in specials and 0 <= i < vocab_size:
      out.append(i)
  return out


class ByteTokenizer:
  """UTF-8 bytes as tokens. ``<sep>`` separates a prompt (question) from its answer."""

  pad_id = NUM_BYTES + 0
  bos_id = NUM_BYTES + 1
  eos_id = NUM_BYTES + 2
  sep_id = NUM_BYTES + 3
  vocab_size = NUM_BYTES + len(SPECIAL_TOKENS)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
    ids = list(text.encode("utf-8"))
    if bos:
      ids.insert(0, self.bos_id)
    if eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
    """Bytes back to text; specials are dropped, decoding stops at the first ``<eos>``."""
    out = bytearray()
    for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
      i = int(i)
      if i == self.eos_id and stop_at_eos:
        break
      out += self._id_bytes(i)
    # A model can emit a truncated multi-byte sequence; show it rather than fail.
    return out.decode("utf-8", errors="replace")

  def _id_bytes(self, i: int) -> bytes:
    """The bytes token ``i`` stands for (none for specials / ids past the vocabulary)."""
    return bytes([i]) if 0 <= i < NUM_BYTES else b""

  def decode_batch(self, batch: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    return [self.decode(row) for row in np.asarray(batch)]

  def token_name(self, i: int) -> str:
    if i >= NUM_BYTES:
      return SPECIAL_TOKENS[i - NUM_BYTES]
    return bytes([i]).decode("latin-1")


# GPT-2-style pre-tokenization: a word with its optional leading space, or one character.
_PIECES = re.compile(r" ?\w+|.", re.DOTALL)


class WordTokenizer(ByteTokenizer):
  """Bytes + specials (ids as in ``ByteTokenizer``), then one id per known word piece.

  ``words``: the vocabulary; each word ``w`` gets two pieces, ``"w"`` and ``" w"`` (the
  leading-space form, as in GPT-2's BPE), so "a red square" is 3 tokens. A piece not in the
  vocabulary is split into its longest known prefix and the rest (recursively), and what
  matches no word is encoded as UTF-8 bytes.
  """

  def __init__(self, words: Sequence[str]):
    pieces: list[str] = []
    for w in words:
      if not isinstance(w, str) or not re.fullmatch(r"\w+", w):
        raise ValueError(f"WordTokenizer word {w!r} is invalid: must be a non-empty run of "
                         "letters, digits or '_'")
      for p in (w, " " + w):
        if p not in pieces:
          pieces.append(p)
    self.pieces = tuple(pieces)
    self._base = NUM_BYTES + len(SPECIAL_TOKENS)
    self._ids = {p: self._base + i for i, p in enumerate(self.pieces)}
    self.vocab_size = self._base + len(self.pieces)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"WordTokenizer.encode expects str, got {type(text).__name__}")
    ids = [self.bos_id] if bos else []
    for m in _PIECES.finditer(text):
      ids.extend(self._encode_piece(m.group(0)))
    if eos:
      ids.append(self.eos_id)
    return ids

  def _encode_piece(self, piece: str) -> list[int]:
    """Greedy longest known prefix first (WordPiece-style), bytes where none matches: so
    " circles" -> " circle" + "s" and shares the singular's embedding."""
    out: list[int] = []
    while piece:
      for j in range(len(piece), 0, -1):
        i = self._ids.get(piece[:j])
        if i is not None:
          out.append(i)
          piece = piece[j:]
          break
      else:
        out.extend(piece[0].encode("utf-8"))
        piece = piece[1:]
    return out

  def _id_bytes(self, i: int) -> bytes:
    if self._base <= i < self.vocab_size:
      return self.pieces[i - self._base].encode("utf-8")
    return super()._id_bytes(i)

  def token_name(self, i: int) -> str:
    if i >= self._base:
      return self.pieces[i - self._base]
    return super().token_name(i)
