"""Post-training quantization: int8 weights (+ calibrated or dynamic int8 activations), and
group-wise int4 weight-only; and how far a quantized model's logits are from the float ones.

PTQ replaces each weight a rule matches, at its first call, by
``WithAux(QArray(qvalue=int8|int4, scale=float32))``.

Calibration: qwix PTQ alone takes static activation scales from the single sample call. We
run the calibration batches through a ``QtProvider`` model (which accumulates
``quant_stats``) and convert it with ``PtqProvider`` (which consumes them), with matmul
activations calibrated per tensor (``rules.qt_rule``).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from gptjax import batch as batch_lib
from gptjax.compress.quantize import build
from gptjax.compress.quantize.rules import check_rules, default_rules, qt_rule
from gptjax.layout import loop_layout

# The jitted forward(model, batch) every quantized-vs-float comparison shares (one compile
# per model class and batch shape).
jit_forward = nnx.jit(batch_lib.forward)


def _check_callable(q_model: nnx.Module, batch) -> None:
  """Trace one forward of a PTQ model (no compute) to fail early with a clear message."""
  try:
    jax.eval_shape(lambda: batch_lib.forward(q_model, batch))
  except ValueError as e:
    if "Unsupported type" in str(e) and "QArray" in str(e):
      raise RuntimeError(
          "a layer casts its quantized kernel with `.astype`, which qwix's WithAux does not "
          "support: gptjax.layers.linear.Dense must cast with "
          "`flax.nnx.nn.dtypes.promote_dtype((x, kernel, bias), dtype=self.dtype)` (what "
          "nnx.Linear does, and what qwix intercepts)") from e
    raise


def _batches(calibration_batches) -> list:
  batches = [calibration_batches] if isinstance(calibration_batches, Mapping) else list(
      calibration_batches)
  if not batches:
    raise ValueError("calibration_batches is empty: give at least one batch")
  return batches


def _calibrate(model: nnx.Module, rules, batches) -> dict:
  """quant_stats of a QT model (same rules) that accumulated each op's activation absmax
  (count + sum) over ``batches``, one compiled forward per batch."""
  qt = build.abstract_quantize(model, qwix.QtProvider([qt_rule(r) for r in rules]),
                               batches[0])
  nnx.update(qt, nnx.state(model))
  build.zero_stats(qt)
  build.check_concrete(qt, "calibration model")
  observe = nnx.jit(batch_lib.forward)
  for b in batches:
    observe(qt, b)
  return build.quant_stats(qt)


def ptq_int8(model: nnx.Module, calibration_batches, *, weights: bool = True,
             activations: bool = True, static_activations: bool = True,
             rules: Optional[Sequence[qwix.QuantizationRule]] = None,
             include_head: bool = False) -> nnx.Module:
  """int8 post-training quantization; returns a new (quantized) model.

  Weights: per-output-channel symmetric int8 (absmax). Activations (``activations=True``):
  int8 with a *static* per-tensor scale calibrated over ``calibration_batches`` (dicts with
  ``inputs`` and optional ``image``), or, with ``static_activations=False``, a dynamic
  per-token scale computed at run time. int8 x int8 matmuls then run in integer arithmetic
  (qwix's fast path). ``rules`` replaces ``default_rules`` (which keep embeddings, norms and
  the untied LM head float).
  """
  model = loop_layout(model)  # the rules name blocks/<i>/...
  batches = _batches(calibration_batches)
  if not weights:
    raise ValueError("weights=False is not supported: qwix quantizes an op only when its "
                     "rule has a weight_qtype (no activation-only quantization)")
  if rules is None:
    rules = default_rules(model, weight_qtype="int8",
                          act_qtype="int8" if activations else None,
                          act_static_scale=activations and static_activations,
                          include_head=include_head)
  rules = check_rules(rules)
  stats = _calibrate(model, rules, batches) if any(r.act_static_scale for r in rules) else {}
  q_model = build.materialize(
      build.abstract_quantize(model, qwix.PtqProvider(rules), batches[0]),
      build.float_state(model), stats)
  _check_callable(q_model, batches[0])
  return q_model


def int4_weight_only(model: nnx.Module, *, group_size: int = 32, sample_batch=None,
                     weight_qtype: str = "int4", include_head: bool = False,
                     rules: Optional[Sequence[qwix.QuantizationRule]] = None) -> nnx.Module:
  """Group-wise weight-only quantization (default int4, one float32 scale per
  ``group_size`` consecutive weights of each output's reduction); activations stay float.

  Convs stay float (qwix's PTQ conv needs equal weight/activation qtypes, no tiling).
  ``sample_batch`` only provides shapes (a dummy is built from ``model.config`` if None).
  """
  model = loop_layout(model)  # the rules name blocks/<i>/...
  if rules is None:
    rules = default_rules(model, weight_qtype=weight_qtype, group_size=group_size,
                          include_head=include_head)
  batch = build.sample_or_dummy(model, sample_batch)
  q_model = build.materialize(
      build.abstract_quantize(model, qwix.PtqProvider(list(rules)), batch),
      build.float_state(model), {})
  _check_callable(q_model, batch)
  return q_model


def quantized_forward_error(float_model: nnx.Module, q_model: nnx.Module, batch) -> float:
  """Relative L2 error ||q - f|| / ||f|| of the logits on ``batch`` (jitted forwards)."""
  ref = jit_forward(float_model, batch).astype(jnp.float32)
  out = jit_forward(q_model, batch).astype(jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
