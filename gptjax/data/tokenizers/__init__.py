"""Tokenizers behind one small interface (``encode(text, bos=, eos=)``, ``decode(ids)``,
``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``sep_id``):

  ``byte``    UTF-8 bytes + 4 specials (no files, every string round-trips)
  ``shapes``  bytes + one token per word of the built-in ``shapes`` data
  a path      a byte-level BPE (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``)
              or a SentencePiece ``.model`` — a file or a directory holding one

Train either kind on your own text, offline:

  python -m gptjax.data.tokenizers train --kind bpe --vocab 8192 FILES... --out DIR

``save_tokenizer`` / ``load_tokenizer`` keep one in a directory (a training workdir holds
the one its run used, so prompts are encoded the way the model was trained).
"""
from __future__ import annotations

import json
import os

from gptjax.data.builders.shapes.shapes import vocabulary as shapes_vocabulary
from gptjax.data.tokenizers import bpe, spm
from gptjax.data.tokenizers.bpe import BPETokenizer
from gptjax.data.tokenizers.byte import (NUM_BYTES, SPECIAL_TOKENS, ByteTokenizer,
                                         WordTokenizer)
from gptjax.data.tokenizers.spm import SentencePieceTokenizer

TOKENIZERS = ("byte", "shapes")  # the built-in names; anything else is a path
KINDS = ("bpe", "spm")  # what `train` makes
_NAMED = "tokenizer_name.json"  # a built-in tokenizer saved into a directory: its name

__all__ = ["ByteTokenizer", "WordTokenizer", "BPETokenizer", "SentencePieceTokenizer",
           "NUM_BYTES", "SPECIAL_TOKENS", "TOKENIZERS", "KINDS", "make_tokenizer",
           "load_tokenizer", "save_tokenizer", "train"]


def make_tokenizer(name: str = "byte"):
  """``'byte'``, ``'shapes'``, or the path of a BPE / SentencePiece tokenizer (a file, or a
  directory holding ``tokenizer.json``, ``vocab.json`` + ``merges.txt`` or ``tokenizer.model``)."""
  if name == "byte":
    return ByteTokenizer()
  if name == "shapes":
    return WordTokenizer(shapes_vocabulary())
  if not isinstance(name, str) or not name:
    raise ValueError(f"tokenizer {name!r} is invalid: allowed values are "
                     f"{', '.join(map(repr, TOKENIZERS))} or a tokenizer file / directory")
  return load_tokenizer(name)


def load_tokenizer(path: str):
  """The tokenizer stored at ``path`` (see ``make_tokenizer``)."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    named = os.path.join(path, _NAMED)
    if os.path.exists(named):
      with open(named) as f:
        return make_tokenizer(json.load(f)["name"])
    if os.path.exists(os.path.join(path, spm.FILE)):
      return SentencePieceTokenizer.from_file(path)
    return BPETokenizer.from_file(path)
  if not os.path.exists(path):
    raise ValueError(f"tokenizer {path!r} is invalid: allowed values are "
                     f"{', '.join(map(repr, TOKENIZERS))} or an existing tokenizer file / "
                     "directory (no such path)")
  if path.endswith(".model"):
    return SentencePieceTokenizer.from_file(path)
  return BPETokenizer.from_file(path)


def save_tokenizer(tok, directory: str) -> str:
  """Write ``tok`` into ``directory`` so that ``load_tokenizer(directory)`` gives it back."""
  os.makedirs(directory, exist_ok=True)
  if isinstance(tok, (BPETokenizer, SentencePieceTokenizer)):
    return tok.save(directory)
  name = "shapes" if isinstance(tok, WordTokenizer) else "byte"
  if name == "shapes" and tok.pieces != WordTokenizer(shapes_vocabulary()).pieces:
    raise ValueError("only the built-in 'shapes' WordTokenizer can be saved by name")
  path = os.path.join(directory, _NAMED)
  with open(path, "w") as f:
    json.dump({"name": name}, f)
  return path


def train(kind: str, files, vocab_size: int):
  """A ``kind`` ('bpe' | 'spm') tokenizer of ``vocab_size`` ids trained on ``files``."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is invalid: allowed values are {KINDS}")
  if vocab_size < 300:
    raise ValueError(f"vocab_size={vocab_size} is invalid: must be >= 300 (the 256 byte "
                     "symbols and the specials come first)")
  return (bpe.train if kind == "bpe" else spm.train)(list(files), vocab_size)
