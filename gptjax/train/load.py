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
from gptjax.config import VisionConfig
from gptjax.train.checkpoint import Checkpointer
from gptjax.data.tokenizers import load_tokenizer, save_tokenizer
from gptjax.train.config import CONFIG_VERSION, draw_section, tokenizer_for, validate
from gptjax.train.hooks import RunHooks
from gptjax.train.optim import make_optimizer
from gptjax.train.state import create_train_state, restore_train_state

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def save_run_config(c: ml_collections.ConfigDict, logdir: str) -> None:
  """``config.json`` and a copy of the run's tokenizer (``tokenizer/``) into ``logdir``, so
  the workdir alone rebuilds the model and encodes prompts as training did."""
  if jax.process_index() == 0:
    with open(os.path.join(logdir, CONFIG_FILE), "w") as f:
      f.write(c.to_json_best_effort(indent=2, sort_keys=True))
    save_tokenizer(tokenizer_for(c), os.path.join(logdir, TOKENIZER_DIR))


def load_run_tokenizer(workdir: str, config: Optional[ml_collections.ConfigDict] = None):
  """The tokenizer a workdir's run trained with: its saved copy, else (runs saved before
  copies were kept) the one its config names."""
  saved = os.path.join(workdir, TOKENIZER_DIR)
  if os.path.isdir(saved):
    return load_tokenizer(saved)
  return tokenizer_for(config or load_run_config(workdir))


def _migrate(d: dict) -> dict:
  """A saved config dict in today's layout (``CONFIG_VERSION``)."""
  version = d.get("version", 1)
  if version < 2 and d.get("model") is not None:
    m = d["model"]
    if "head_size" in m:
      m["head_dim"] = m.pop("head_size")
    # Version 1 counted image tokens in max_seq_len; today it bounds the text alone.
    if m.get("vision") is not None:
      v = dict(m["vision"])
      v["cnn_channels"] = tuple(v["cnn_channels"])
      m["max_seq_len"] -= VisionConfig(**v).num_tokens
  if isinstance(d.get("draw"), dict):  # keys added to the draw section since (best_of)
    for k, v in draw_section().to_dict().items():
      d["draw"].setdefault(k, v)
  d["version"] = CONFIG_VERSION
  return d


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config a workdir was trained with (older layouts migrated), locked."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a gptjax training workdir?")
  with open(path) as f:
    c = ml_collections.ConfigDict(_migrate(json.load(f)))
  c.lock()
  return c


def load_model(workdir: str, *, config: Optional[ml_collections.ConfigDict] = None,
               step: Optional[int] = None, hooks: Optional[RunHooks] = None) -> nnx.Module:
  """Rebuild the model of a training workdir and restore its latest (or ``step``) params.

  ``hooks``: as the run was trained (e.g. a distillation ``Student`` wrapper as
  ``model_fn``, a pruning optimizer as ``wrap_tx`` — the optimizer state must match to
  restore); ``hooks.eval_model(module)`` then picks the model out of the wrapper.
  ``gptjax.load_model`` adds what the run's config enabled (QAT, gradual pruning).
  """
  c = config or load_run_config(workdir)
  hooks = hooks or RunHooks()
  mcfg = validate(c)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = make_optimizer(c)
  if hooks.wrap_tx is not None:
    tx = hooks.wrap_tx(tx)
  graphdef, rest, abstract, _ = create_train_state(mcfg, tx, mesh, c.seed,
                                                    model_fn=hooks.model_fn, abstract=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.every)
  try:
    state = restore_train_state(ckpt, abstract, step=step)
  finally:
    ckpt.close()
  module = nnx.merge(graphdef, state.params, rest)
  module.eval()
  return hooks.eval_model(module)
