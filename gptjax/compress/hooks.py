"""Compression *during* training, switched on from the training config, turned into
``RunHooks`` for the trainer (which knows nothing of compression):

  config.qat.enabled=True     train through fake-quantized weights and activations
                              (``quantize.qat_model``: qwix QtProvider, straight-through
                              gradients); ``quantize.convert_qat_to_int8`` then gives the int8
                              model of the trained run.
  config.prune.enabled=True   gradual magnitude (or N:M) pruning on the Zhu & Gupta cubic
                              schedule (``prune.gradual_pruning`` wrapping the optimizer); the
                              masks live in the optimizer state, so they are checkpointed.

``hooks_for(config, hooks)`` composes these with a trainer's own hooks; ``gptjax.runs``
(``train``, ``load_model``) and the distillation trainer call it, so a workdir reloads as
exactly what was trained (the QAT model, the pruning optimizer state) from its saved config.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import ml_collections

from gptjax.compress import prune
from gptjax.model import from_config
from gptjax.train import load as train_load
from gptjax.train.config import fail
from gptjax.train.hooks import RunHooks

QAT_QTYPES = ("int8", "int4")
PRUNE_METHODS = ("global", "layerwise", "n_m")
QUANT_EXTRA = "pip install 'gptjax[quant]'"


def require_qwix(what: str) -> None:
  """Fails (ValueError) when qwix, the optional quantization dependency, is not installed:
  called by config validation so a run that needs it stops before any training."""
  try:
    import qwix  # noqa: F401
  except ImportError as e:
    raise ValueError(f"{what} needs qwix, which is not installed ({e}); "
                     f"install the quantization extra: {QUANT_EXTRA}") from None


def qat_section() -> ml_collections.ConfigDict:
  """``config.qat``: quantization-aware training (off unless enabled)."""
  return ml_collections.ConfigDict(dict(
      enabled=False,
      weight_qtype="int8",  # per-channel fake-quantized matmul kernels: 'int8' | 'int4'
      # fake-quantized activations (dynamic, per token): 'int8' | 'int4' | None (weight-only)
      act_qtype=ml_collections.FieldReference("int8", field_type=str),
      include_head=False,  # also the output projection (tied heads stay float regardless)
  ))


def prune_section() -> ml_collections.ConfigDict:
  """``config.prune``: gradual pruning during training (off unless enabled)."""
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


def add_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``c`` (a training config) with the ``qat`` and ``prune`` sections, locked."""
  c.unlock()
  c.qat = qat_section()
  c.prune = prune_section()
  c.lock()
  return c


def validate(c) -> None:
  """Checks the ``qat`` and ``prune`` sections (when enabled)."""
  q = _section(c, "qat")
  for name, section in (("qat", q), ("prune", _section(c, "prune"))):
    if section is not None and c.model.get("scan_layers", False):
      # QAT rules and per-layer sparsity name separate blocks (blocks/<i>/...): the stacked
      # layout would quantize nothing / rank all layers' weights together.
      fail("model.scan_layers", True, f"must be False with config.{name}.enabled=True "
           "(quantization-aware training and gradual pruning act on separate blocks); set "
           "--config.model.scan_layers=False")
  if q is not None:
    require_qwix("config.qat.enabled=True (quantization-aware training)")
    if q.weight_qtype not in QAT_QTYPES:
      fail("qat.weight_qtype", q.weight_qtype, f"allowed values are {QAT_QTYPES}")
    act = _act_qtype(q.act_qtype)
    if act is not None and act not in QAT_QTYPES:
      fail("qat.act_qtype", q.act_qtype, f"allowed values are {QAT_QTYPES} or None")
  p = _section(c, "prune")
  if p is not None:
    if p.method not in PRUNE_METHODS:
      fail("prune.method", p.method, f"allowed values are {PRUNE_METHODS}")
    for key in ("final_sparsity", "initial_sparsity"):
      v = p[key]
      if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        fail(f"prune.{key}", v, "must be in [0, 1)")
    if p.initial_sparsity > p.final_sparsity:
      fail("prune.initial_sparsity", p.initial_sparsity,
            f"must be <= prune.final_sparsity={p.final_sparsity}")
    if p.begin_step < 0:
      fail("prune.begin_step", p.begin_step, "must be >= 0")
    if p.end_step != -1 and p.end_step < p.begin_step:
      fail("prune.end_step", p.end_step,
            f"must be >= prune.begin_step={p.begin_step}, or -1 (3/4 of train.steps)")
    if p.frequency < 1:
      fail("prune.frequency", p.frequency, "must be a positive integer")
    if p.method == "n_m":
      if not 0 < p.n <= p.m:
        fail("prune.n", p.n, f"must satisfy 0 < n <= m (m={p.m})")
      if p.final_sparsity <= 0:
        fail("prune.final_sparsity", p.final_sparsity, "must be > 0 for method 'n_m': the "
              "N:M pattern is imposed once the schedule first exceeds 0")


def _qat_model_fn(q, model_fn: Optional[Callable]) -> Callable:
  # qwix is an optional dependency: imported only when a config enables QAT.
  from gptjax.compress.quantize import qat_model

  def qat_model_fn(cfg, seed):
    model = (model_fn or from_config)(cfg, seed)
    return qat_model(model, weight_qtype=q.weight_qtype, act_qtype=_act_qtype(q.act_qtype),
                     include_head=q.include_head)

  return qat_model_fn


def _pruning_wrap_tx(c, p, wrap_tx: Optional[Callable]) -> Callable:
  schedule = functools.partial(
      prune.cubic_schedule, initial_sparsity=p.initial_sparsity,
      final_sparsity=p.final_sparsity, begin_step=p.begin_step, end_step=end_step(c),
      frequency=p.frequency)

  def wrap(tx):
    tx = wrap_tx(tx) if wrap_tx is not None else tx
    return prune.gradual_pruning(tx, schedule, p.method, n=p.n, m=p.m,
                                 include_embeddings=p.include_embeddings)

  return wrap


def hooks_for(c, hooks: Optional[RunHooks] = None) -> RunHooks:
  """``hooks`` (default: none) with what ``c`` enables added: the QAT model around
  ``model_fn`` (``config.qat``), gradual pruning around ``wrap_tx`` (``config.prune``)."""
  hooks = hooks or RunHooks()
  q, p = _section(c, "qat"), _section(c, "prune")
  if q is not None:
    hooks = hooks.replace(model_fn=_qat_model_fn(q, hooks.model_fn))
  if p is not None:
    hooks = hooks.replace(wrap_tx=_pruning_wrap_tx(c, p, hooks.wrap_tx))
  return hooks


def load_model(workdir: str, *, step: Optional[int] = None,
               hooks: Optional[RunHooks] = None):
  """The model a workdir trained, rebuilt as trained from its saved config alone (the QAT
  model, the pruning optimizer state); ``hooks`` as the run had them (distillation)."""
  c = train_load.load_run_config(workdir)
  validate(c)
  return train_load.load_model(workdir, config=c, step=step, hooks=hooks_for(c, hooks))
