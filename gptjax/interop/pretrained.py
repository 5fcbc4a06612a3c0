"""A model and its tokenizer from wherever pretrained weights live: a ``train.py`` workdir,
a gptjax model directory (``python -m gptjax.interop.hf_gpt2 import``), or a Hugging Face
GPT-2 directory. ``gptjax.sample`` and ``config.init_from`` both read weights through here.
"""
from __future__ import annotations

import dataclasses
import json
import os

from gptjax.compress import hooks as compress_hooks
from gptjax.config import ModelConfig
from gptjax.data.tokenizers import load_tokenizer
from gptjax.interop import hf_gpt2
from gptjax.train.load import CONFIG_FILE, TOKENIZER_DIR, load_run_tokenizer

KINDS = ("workdir", "gptjax", "hf_gpt2")


def kind_of(path: str) -> str:
  """Which of ``KINDS`` the directory ``path`` is."""
  if os.path.exists(os.path.join(path, hf_gpt2.GPTJAX_CONFIG)):
    return "gptjax"
  config = os.path.join(path, CONFIG_FILE)
  if os.path.exists(config):
    with open(config) as f:
      return "hf_gpt2" if json.load(f).get("model_type") == "gpt2" else "workdir"
  raise FileNotFoundError(f"{path!r} is not a gptjax workdir, a gptjax model directory or a "
                          "Hugging Face GPT-2 directory (no config.json / model_config.json)")


def load_pretrained(path: str, *, tokenizer: bool = True):
  """(model, tokenizer or None) of the directory ``path`` (see the module docstring)."""
  path = os.path.expanduser(path)
  kind = kind_of(path)
  if kind == "gptjax":
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    if tokenizer and not os.path.isdir(tok_dir):
      raise FileNotFoundError(f"{path} has no {TOKENIZER_DIR}/: import the model from a "
                              "Hugging Face directory that holds its tokenizer files")
    return hf_gpt2.load_gptjax(path), load_tokenizer(tok_dir) if tokenizer else None
  if kind == "hf_gpt2":
    return hf_gpt2.load(path), load_tokenizer(path) if tokenizer else None
  return compress_hooks.load_model(path), load_run_tokenizer(path) if tokenizer else None


def check_same_model(want: ModelConfig, got: ModelConfig, what: str) -> None:
  """``config.model`` must describe the pretrained model exactly (dtypes aside): the error
  names every field that differs."""
  skip = {"dtype", "param_dtype", "remat", "scan_layers", "dropout", "attention_impl"}
  diff = [f"config.model.{f.name}={getattr(want, f.name)!r} (checkpoint: "
          f"{getattr(got, f.name)!r})" for f in dataclasses.fields(want)
          if f.name not in skip and getattr(want, f.name) != getattr(got, f.name)]
  if diff:
    raise ValueError(f"config.init_from={what!r} holds a different model: " + "; ".join(diff))
