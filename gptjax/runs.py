"""A training run, whole: the config schema with every section, its validation, training
and loading the trained model back — the layer where training and compression meet.

``gptjax.train`` trains whatever ``RunHooks`` describe and knows nothing of compression;
``gptjax.compress.hooks`` turns the config's compression sections (``qat``, ``prune``) into
hooks. This module composes the two, and is what ``train.py``, the configs and
``gptjax.load_model`` use.
"""
from __future__ import annotations

from typing import Optional

import ml_collections
from flax import nnx

from gptjax.compress import hooks as compress_hooks
from gptjax.config import ModelConfig
from gptjax.train import config as train_config
from gptjax.train import loop
from gptjax.train.hooks import RunHooks


def base_config() -> ml_collections.ConfigDict:
  """Every section of a training config (training + compression during training), locked:
  a mistyped key raises an error naming it."""
  return compress_hooks.add_sections(train_config.base_config())


def validate(c: ml_collections.ConfigDict) -> ModelConfig:
  """Check every section once; returns the ``ModelConfig``."""
  mcfg = train_config.validate(c)
  compress_hooks.validate(c)
  return mcfg


def train(c: ml_collections.ConfigDict, workdir: str, hooks: Optional[RunHooks] = None) -> dict:
  """``gptjax.train.loop.run`` with what the config enables (QAT, gradual pruning) added to
  ``hooks``; returns the run's summary."""
  validate(c)
  return loop.run(c, workdir, compress_hooks.hooks_for(c, hooks))


def load_model(workdir: str, *, step: Optional[int] = None,
               hooks: Optional[RunHooks] = None) -> nnx.Module:
  """The model a ``train.py`` / ``gptjax.runs.train`` workdir trained, restored from its
  latest (or ``step``) checkpoint and rebuilt as trained (QAT model, pruning optimizer
  state) from its saved config alone; ``hooks`` as the run had them (e.g.
  ``gptjax.compress.distill.student_hooks()`` for a distillation workdir)."""
  return compress_hooks.load_model(workdir, step=step, hooks=hooks)
