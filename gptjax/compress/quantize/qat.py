"""Quantization-aware training: a model whose forward fake-quantizes its weights and
activations (straight-through gradients, qwix ``QtProvider``), and its conversion to the
int8 (PTQ layout) model."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import qwix
from flax import nnx

from gptjax.compress.quantize import build
from gptjax.compress.quantize.rules import default_rules, qt_rule
from gptjax.compress.quantize.storage import pure_tree
from gptjax.layout import loop_layout


def qat_model(model: nnx.Module, *, weight_qtype="int8", act_qtype="int8",
              act_static_scale: bool = False, include_head: bool = False,
              rules: Optional[Sequence[qwix.QuantizationRule]] = None,
              sample_batch=None) -> nnx.Module:
  """Quantization-aware training model: same parameters (float ``nnx.Param``), forward with
  fake-quantized weights (per channel) and activations (dynamic per token by default),
  straight-through gradients (qwix ``QtProvider``). Train it with the normal train step;
  ``convert_qat_to_int8`` then gives the int8 model.

  ``act_static_scale=True`` also keeps running activation statistics (``qwix.QuantStat``
  variables updated by every forward). gptjax's ``make_train_step`` differentiates w.r.t.
  the ``nnx.Param`` s and does not write other model state back, so those statistics would
  stay at their initial values there: the default is dynamic activation scales.
  """
  model = loop_layout(model)  # the rules name blocks/<i>/...
  if rules is None:
    rules = default_rules(model, weight_qtype=weight_qtype, act_qtype=act_qtype,
                          act_static_scale=act_static_scale, include_head=include_head)
  rules = list(rules)
  provider = qwix.QtProvider([qt_rule(r) for r in rules])
  if any(r.act_static_scale for r in rules):
    # Static scales need their quant_stats variables, which qwix creates in the first call.
    q = build.abstract_quantize(model, provider, build.sample_or_dummy(model, sample_batch))
    nnx.update(q, nnx.state(model))
    build.zero_stats(q)
    build.check_concrete(q, "qat_model")
  else:
    # Nothing to create: no model call.
    q = build.quantize_model(model, provider, skip_nnx_init=True)
  # On the class (created per quantize_model call), not the instance: instance attributes
  # would enter the graphdef, which must stay hashable.
  type(q)._gptjax_ptq_rules = tuple(rules)
  return q


def convert_qat_to_int8(qat: Any, ptq_model: Optional[nnx.Module] = None, *,
                        sample_batch=None) -> nnx.Module:
  """The int8 (PTQ layout) model of a QAT model or of its trained parameters.

  ``qat``: the QAT model, or its ``nnx.Param`` state / pure dict (e.g. ``TrainState.params``).
  ``ptq_model``: a PTQ model of the same architecture and rules (its weights are ignored),
  e.g. ``ptq_int8(model, [batch], static_activations=False)`` for the default dynamic QAT;
  built from the QAT model's rules when ``qat`` is the model. Uses
  ``qwix.quantize_params(float_params, ptq_model, quant_stats)``.
  """
  if isinstance(qat, nnx.Module):
    params, stats = build.float_state(qat), build.quant_stats(qat)
    if ptq_model is None:
      rules = getattr(type(qat), "_gptjax_ptq_rules", None)
      if rules is None:
        raise ValueError("qat was not made by qat_model(): pass ptq_model")
      batch = build.sample_or_dummy(qat, sample_batch)
      return build.materialize(
          build.abstract_quantize(qat, qwix.PtqProvider(list(rules)), batch), params, stats)
  else:
    if ptq_model is None:
      raise ValueError("converting QAT parameters (not a model) needs ptq_model: a PTQ model "
                       "with the same architecture and rules")
    params, stats = pure_tree(qat), {}
  # A concrete template keeps its values for what params do not cover (e.g. RNG state).
  return build.materialize(nnx.clone(ptq_model), params, stats)
