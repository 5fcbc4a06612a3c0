"""Byte-level BPE (GPT-2's scheme) through the ``tokenizers`` package: load GPT-2's
``vocab.json`` + ``merges.txt`` or any ``tokenizer.json``, or train one on your own files.

Text is kept verbatim: a file that spells "<|endoftext|>" or "<eos>" is encoded as those
characters, never as the special id (``encode_special_tokens``); specials enter only where
gptjax puts them (document ends, prompts). Special ids: looked up by name in the vocabulary — ``<pad>``, ``<bos>``, ``<eos>``, ``<sep>``
(what ``train`` adds), else GPT-2's single ``<|endoftext|>``, which then serves as bos, eos,
pad and separator alike (GPT-2 has no others).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptjax.data.tokenizers.byte import text_ids

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
GPT2_EOT = "<|endoftext|>"
FILE = "tokenizer.json"


class BPETokenizer:
  """``encode`` / ``decode`` with the interface of ``ByteTokenizer``."""

  kind = "bpe"

  def __init__(self, tokenizer: Tokenizer):
    self.tok = tokenizer
    tokenizer.encode_special_tokens = True  # special strings in text stay text
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def special(*names):
      for n in names:
        i = tokenizer.token_to_id(n)
        if i is not None:
          return i
      raise ValueError(f"BPE vocabulary has none of the special tokens {names}: train it "
                       f"with gptjax (adds {SPECIALS}) or use a GPT-2 vocabulary "
                       f"({GPT2_EOT!r})")

    self.eos_id = special("<eos>", GPT2_EOT)
    self.bos_id = special("<bos>", GPT2_EOT)
    self.pad_id = special("<pad>", GPT2_EOT)
    self.sep_id = special("<sep>", GPT2_EOT)
    self._specials = {self.eos_id, self.bos_id, self.pad_id, self.sep_id}

  @classmethod
  def from_file(cls, path: str) -> "BPETokenizer":
    """A ``tokenizer.json`` file, or a directory holding one or GPT-2's ``vocab.json`` +
    ``merges.txt``."""
    if os.path.isdir(path):
      if os.path.exists(os.path.join(path, FILE)):
        path = os.path.join(path, FILE)
      elif os.path.exists(os.path.join(path, "vocab.json")):
        return cls.from_vocab_merges(os.path.join(path, "vocab.json"),
                                     os.path.join(path, "merges.txt"))
      else:
        raise FileNotFoundError(f"{path!r} holds neither {FILE} nor vocab.json + merges.txt")
    return cls(Tokenizer.from_file(path))

  @classmethod
  def from_vocab_merges(cls, vocab: str, merges: str) -> "BPETokenizer":
    """GPT-2's files: byte-level pre-tokenizer without an added prefix space, as GPT-2."""
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(GPT2_EOT) is not None:
      tok.add_special_tokens([GPT2_EOT])
    return cls(tok)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"BPETokenizer.encode expects str, got {type(text).__name__}")
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Iterable[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
    out = text_ids(ids, eos_id=self.eos_id, specials=self._specials,
                   vocab_size=self.vocab_size, stop_at_eos=stop_at_eos)
    return self.tok.decode(out, skip_special_tokens=False)

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILE)
    self.tok.save(path)
    return path


def train(files: Sequence[str], vocab_size: int, *, min_frequency: int = 2) -> BPETokenizer:
  """A byte-level BPE with ``vocab_size`` ids (the 4 specials and 256 byte symbols
  included) trained on ``files``; every string round-trips (bytes are in the alphabet)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIALS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train(list(files), trainer)
  return BPETokenizer(tok)
