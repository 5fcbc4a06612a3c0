"""Byte-level tokenizer: 256 byte ids plus a few special tokens.

Every UTF-8 string round-trips and nothing needs downloading, which is what the built-in
datasets and tests want. Id layout: bytes 0..255 map to ids 0..255; the specials follow.
A sentencepiece tokenizer can later implement the same small interface
(``encode``, ``decode``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``sep_id``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

NUM_BYTES = 256
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")


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
      if 0 <= i < NUM_BYTES:
        out.append(i)
    # A model can emit a truncated multi-byte sequence; show it rather than fail.
    return out.decode("utf-8", errors="replace")

  def decode_batch(self, batch: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    return [self.decode(row) for row in np.asarray(batch)]

  def token_name(self, i: int) -> str:
    if i >= NUM_BYTES:
      return SPECIAL_TOKENS[i - NUM_BYTES]
    return bytes([i]).decode("latin-1")
