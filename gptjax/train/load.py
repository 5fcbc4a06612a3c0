"""A trained model back from its workdir: ``load_model('runs/demo')``.

``run`` writes the full training config to ``<workdir>/config.json`` at start, so a workdir
alone is enough to rebuild the model and restore its parameters.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections
from flax import nnx

from gptjax import sharding as shd
from gptjax.checkpoint import Checkpointer

CONFIG_FILE = "config.json"


def save_run_config(c: ml_collections.ConfigDict, logdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(logdir, CONFIG_FILE), "w") as f:
      f.write(c.to_json_best_effort(indent=2, sort_keys=True))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a gptjax training workdir?")
  with open(path) as f:
    c = ml_collections.ConfigDict(json.load(f))
  c.lock()
  return c


def load_model(workdir: str, *, config: Optional[ml_collections.ConfigDict] = None,
               step: Optional[int] = None, model_fn=None, select=None,
               wrap_tx=None) -> nnx.Module:
  """Rebuild the model of a training workdir and restore its latest (or ``step``) params.

  ``model_fn`` / ``wrap_tx``: as the run was trained (e.g. a distillation ``Student``
  wrapper, a pruning optimizer — the optimizer state must match to restore);
  ``select(module)`` then picks the model out of the wrapper. What the run's config enabled
  (``qat``: the QAT model; ``prune``: the gradual-pruning optimizer state) is rebuilt from
  the config on top of these.
  """
  from gptjax.compress import training
  from gptjax.train.config import validate
  from gptjax.train.optim import make_optimizer
  from gptjax.train.state import abstract_train_state, create_train_state

  c = config or load_run_config(workdir)
  mcfg = validate(c)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = make_optimizer(c)
  wrap_tx = training.wrap_tx_for(c, wrap_tx)
  if wrap_tx is not None:
    tx = wrap_tx(tx)
  graphdef, rest, state, shardings = create_train_state(
      mcfg, tx, mesh, c.seed, model_fn=training.model_fn_for(c, model_fn))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.every)
  try:
    state = ckpt.restore(abstract_train_state(state, shardings), step=step)
  finally:
    ckpt.close()
  module = nnx.merge(graphdef, state.params, rest)
  module.eval()
  return select(module) if select is not None else module
