"""A training run, whole: the config schema with every section, its validation, training
and loading the trained model back — the layer where training and compression meet.

``gptjax.train`` trains whatever ``RunHooks`` describe and knows nothing of compression;
``gptjax.compress.hooks`` turns the config's compression sections (``qat``, ``prune``) into
hooks. This module composes the two, and is what ``train.py``, the configs and
``gptjax.load_model`` use.
"""
from __future__ import annotations

import os
from typing import Optional

import ml_collections
from flax import nnx

from gptjax.compress import hooks as compress_hooks
from gptjax.config import ModelConfig
from gptjax.interop.pretrained import check_same_model, load_pretrained
from gptjax.train import config as train_config
from gptjax.train import loop
from gptjax.train.hooks import RunHooks


def base_config() -> ml_collections.ConfigDict:
  """Every section of a training config (training + compression during training), locked:
  a mistyped key raises an error naming it. ``init_from``: start from pretrained weights —
  a ``train.py`` workdir, a gptjax model directory or a Hugging Face GPT-2 directory
  (``config.model`` must describe that model); '' trains from a random init."""
  c = compress_hooks.add_sections(train_config.base_config())
  c.unlock()
  c.init_from = ""
  c.lock()
  return c


def validate(c: ml_collections.ConfigDict) -> ModelConfig:
  """Check every section once; returns the ``ModelConfig``."""
  mcfg = train_config.validate(c)
  compress_hooks.validate(c)
  init_from = c.get("init_from", "")
  if init_from and not os.path.isdir(os.path.expanduser(init_from)):
    train_config.fail("init_from", init_from, "must be '' or an existing directory (a "
                      "train.py workdir, a gptjax model directory or a Hugging Face GPT-2 "
                      "directory)")
  return mcfg


def pretrained_params(c: ml_collections.ConfigDict) -> Optional[nnx.State]:
  """The ``nnx.Param`` state of ``config.init_from`` (checked against ``config.model``), or
  None. ``run`` places it with the run's own shardings, so any mesh (FSDP, tensor parallel)
  fine-tunes it."""
  if not c.get("init_from", ""):
    return None
  model, _ = load_pretrained(c.init_from, tokenizer=False)
  check_same_model(train_config.model_config(c), model.config, c.init_from)
  return nnx.state(model, nnx.Param)


def train(c: ml_collections.ConfigDict, workdir: str, hooks: Optional[RunHooks] = None) -> dict:
  """``gptjax.train.loop.run`` with what the config enables (QAT, gradual pruning,
  ``init_from``) added to ``hooks``; returns the run's summary."""
  validate(c)
  hooks = hooks or RunHooks()
  if hooks.init_params is None:
    hooks = hooks.replace(init_params=pretrained_params(c))
  return loop.run(c, workdir, compress_hooks.hooks_for(c, hooks))


def load_model(workdir: str, *, step: Optional[int] = None,
               hooks: Optional[RunHooks] = None) -> nnx.Module:
  """The model a ``train.py`` / ``gptjax.runs.train`` workdir trained, restored from its
  latest (or ``step``) checkpoint and rebuilt as trained (QAT model, pruning optimizer
  state) from its saved config alone; ``hooks`` as the run had them (e.g.
  ``gptjax.compress.distill.student_hooks()`` for a distillation workdir)."""
  return compress_hooks.load_model(workdir, step=step, hooks=hooks)
