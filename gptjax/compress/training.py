"""Compression *during* training, switched on from the training config.

  config.qat.enabled=True     train through fake-quantized weights and activations
                              (``quantize.qat_model``: qwix QtProvider, straight-through
                              gradients); ``quantize.convert_qat_to_int8`` then gives the int8
                              model of the trained run.
  config.prune.enabled=True   gradual magnitude (or N:M) pruning on the Zhu & Gupta cubic
                              schedule (``prune.gradual_pruning`` wrapping the optimizer); the
                              masks live in the optimizer state, so they are checkpointed.

``run`` and ``load_model`` both build the trained module and optimizer through
``model_fn_for`` / ``wrap_tx_for``, so a workdir reloads as exactly what was trained (the
QAT model, the pruning optimizer state) from its saved config alone.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import ml_collections

QAT_QTYPES = ("int8", "int4")
PRUNE_METHODS = ("global", "layerwise", "n_m")


def qat_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=False,
      weight_qtype="int8",  # per-channel fake-quantized matmul kernels: 'int8' | 'int4'
      # fake-quantized activations (dynamic, per token): 'int8' | 'int4' | None (weight-only)
      act_qtype=ml_collections.FieldReference("int8", field_type=str),
      include_head=False,  # also the output projection (tied heads stay float regardless)
  ))


def prune_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=False,
      method="global",  # 'global' | 'layerwise' L1 magnitude, or 'n_m' (N:M, reduction axis)
      final_sparsity=0.5, initial_sparsity=0.0,  # magnitude methods
      begin_step=0,
      end_step=-1,  # -1: 3/4 of train.steps (the last quarter trains at the final sparsity)
      frequency=10,  # masks are recomputed at most every this many steps
      n=2, m=4,  # n_m: keep n of every m weights
      include_embeddings=False,
  ))


def _section(c, name: str) -> Optional[ml_collections.ConfigDict]:
  """The section if present and enabled; runs saved before it existed have none."""
  s = c.get(name) if hasattr(c, "get") else None
  return s if s is not None and s.get("enabled", False) else None


def _act_qtype(value) -> Optional[str]:
  return None if value is None or str(value).lower() in ("", "none") else value


def end_step(c) -> int:
  p = c.prune
  return p.end_step if p.end_step >= 0 else max(p.begin_step, (3 * c.train.steps) // 4)


def validate(c) -> None:
  """Checks the ``qat`` and ``prune`` sections (when enabled); called by the config's
  ``validate``."""
  from gptjax.train.config import _fail  # one error format for every config field
  q = _section(c, "qat")
  if q is not None:
    if q.weight_qtype not in QAT_QTYPES:
      _fail("qat.weight_qtype", q.weight_qtype, f"allowed values are {QAT_QTYPES}")
    act = _act_qtype(q.act_qtype)
    if act is not None and act not in QAT_QTYPES:
      _fail("qat.act_qtype", q.act_qtype, f"allowed values are {QAT_QTYPES} or None")
  p = _section(c, "prune")
  if p is not None:
    if p.method not in PRUNE_METHODS:
      _fail("prune.method", p.method, f"allowed values are {PRUNE_METHODS}")
    for key in ("final_sparsity", "initial_sparsity"):
      v = p[key]
      if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        _fail(f"prune.{key}", v, "must be in [0, 1)")
    if p.initial_sparsity > p.final_sparsity:
      _fail("prune.initial_sparsity", p.initial_sparsity,
            f"must be <= prune.final_sparsity={p.final_sparsity}")
    if p.begin_step < 0:
      _fail("prune.begin_step", p.begin_step, "must be >= 0")
    if p.end_step != -1 and p.end_step < p.begin_step:
      _fail("prune.end_step", p.end_step,
            f"must be >= prune.begin_step={p.begin_step}, or -1 (3/4 of train.steps)")
    if p.frequency < 1:
      _fail("prune.frequency", p.frequency, "must be a positive integer")
    if p.method == "n_m":
      if not 0 < p.n <= p.m:
        _fail("prune.n", p.n, f"must satisfy 0 < n <= m (m={p.m})")
      if p.final_sparsity <= 0:
        _fail("prune.final_sparsity", p.final_sparsity, "must be > 0 for method 'n_m': the "
              "N:M pattern is imposed once the schedule first exceeds 0")


def model_fn_for(c, model_fn: Optional[Callable] = None) -> Optional[Callable]:
  """``model_fn`` (default GPT/VLM) made a QAT model when ``config.qat.enabled``."""
  q = _section(c, "qat")
  if q is None:
    return model_fn

  def qat_model_fn(cfg, seed):
    from gptjax.compress.quantize import qat_model
    from gptjax.train.state import make_model
    model = (model_fn or make_model)(cfg, seed)
    return qat_model(model, weight_qtype=q.weight_qtype, act_qtype=_act_qtype(q.act_qtype),
                     include_head=q.include_head)

  return qat_model_fn


def wrap_tx_for(c, wrap_tx: Optional[Callable] = None) -> Optional[Callable]:
  """``wrap_tx`` followed by ``prune.gradual_pruning`` when ``config.prune.enabled``."""
  p = _section(c, "prune")
  if p is None:
    return wrap_tx
  from gptjax.compress import prune
  schedule = functools.partial(
      prune.cubic_schedule, initial_sparsity=p.initial_sparsity,
      final_sparsity=p.final_sparsity, begin_step=p.begin_step, end_step=end_step(c),
      frequency=p.frequency)

  def wrap(tx):
    tx = wrap_tx(tx) if wrap_tx is not None else tx
    return prune.gradual_pruning(tx, schedule, p.method, n=p.n, m=p.m,
                                 include_embeddings=p.include_embeddings)

  return wrap
