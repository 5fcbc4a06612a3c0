"""Quantization through qwix: int8 PTQ (weights + calibrated activations), group-wise int4
weight-only, QAT (fake quant, straight-through gradients) and compact checkpoints.

How qwix quantizes an NNX model
-------------------------------
``qwix.quantize_model(model, provider, *sample_inputs)`` clones the model, swaps its class for
a subclass whose ``__call__`` runs with ``jax.lax.dot_general``, ``jax.numpy.einsum`` and
``jax.lax.conv_general_dilated`` intercepted (their ``__code__`` is patched, so every alias
and stored reference is caught -- ``nnx.Conv``'s ``self.conv_general_dilated`` included) and
calls it once. An intercepted op asks the rules (first match wins) by *module path*
(``'blocks/0/attn/q'``: ``nnx.iter_modules`` path joined by ``/``; the module is the nearest
frame whose ``self`` is an ``nnx.Module``). An operand that is one of the module's own
``nnx.Param`` s is a weight, anything else an activation. PTQ replaces a weight, at that
first call, by ``WithAux(QArray(qvalue=int8|int4, scale=float32))``.

So in our models: ``Dense`` (``lax.dot_general``) and ``nnx.Conv`` are quantized;
``Embed.attend`` (``jnp.einsum``) would be too, but the default rules leave embeddings,
positions and norms float (a quantized tied table would also break the ``jnp.take`` lookup),
and never touch attention's activation x activation einsums (module ``.../attn``).

qwix intercepts one method per NNX model, ``__call__``: cached decoding works because
``GPT.decode``/``VLM.decode`` go through ``__call__(..., cache=...)`` (``generate`` runs on a
quantized model).

What is written by hand, and why
--------------------------------
* The rules: qwix matches modules by path regex; we list our ``Dense``/``nnx.Linear``/
  ``nnx.Conv`` modules explicitly so nothing else (attention einsums, the embedding) is hit.
* int4 groups over multi-axis reductions (attention ``o``: kernel (N, H, D), contraction over
  (N, H)): qwix's integer ``tile_size`` only tiles the innermost contracting axis, so a group
  wider than H is written as a per-module ``tile_size`` mapping (``_group_tiles``).
* Calibration: qwix PTQ alone takes static activation scales from the single sample call.
  We run the calibration batches through a ``QtProvider`` model (which accumulates
  ``quant_stats``) and convert it with ``PtqProvider`` (which consumes them). qwix's statistic
  is the *mean* over calibration batches of the absmax, and with its default per-token
  channelwise axes that is the mean of per-token maxima -- it clips every larger token
  (12 % logits error measured on the tiny GPT). We calibrate per tensor instead
  (``lhs_disable_channelwise_axes``): mean over batches of the batch absmax (2.7 %).
* No eager quantization call: qwix initialises an NNX model by calling it eagerly (~10 s of
  per-primitive compilation here); we trace that call with ``nnx.eval_shape`` and fill the
  values with one jitted ``qwix.quantize_params`` (``_materialize``), which also casts the
  float32 static scales it makes to the model's activation dtype (bf16 models need it).
* Packing int4 for storage (orbax writes int4 as one byte per element; see ``save_pytree``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import qwix
from flax import nnx, traverse_util

from gptjax.layers.linear import Dense, logical_axes

QTYPES = ("int8", "int4")
_INT4_DTYPES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))

# -------------------------------------------------------------------------------------------
# Calling a GPT or a VLM on a batch


def _image_to_float(image):
  image = jnp.asarray(image)
  if jnp.issubdtype(image.dtype, jnp.integer):
    return image.astype(jnp.float32) / 255.0
  return image


def _inputs(batch: Mapping[str, Any]) -> tuple[tuple, dict]:
  """(args, kwargs) of ``model(...)`` for a batch ``{"inputs": (B, T) int, ["image"],
  ["segment_ids"], ["positions"]}`` (other keys, e.g. targets, are ignored)."""
  if "inputs" not in batch:
    raise ValueError(f"batch has keys {sorted(batch)}: expected 'inputs' (B, T) int32 "
                     "token ids and optionally 'image' (B, H, W, C) uint8")
  kwargs = {}
  if batch.get("image") is not None:
    kwargs["image"] = _image_to_float(batch["image"])
  for key in ("segment_ids", "positions"):  # packed rows (see GPT.__call__)
    if batch.get(key) is not None:
      kwargs[key] = jnp.asarray(batch[key])
  return (jnp.asarray(batch["inputs"]),), kwargs


def _call(model: nnx.Module, batch: Mapping[str, Any]) -> jax.Array:
  """Logits (B, T, V) of a ``GPT`` (``model(tokens)``) or ``VLM`` (``model(tokens, image=)``);
  a uint8 image is scaled to [0, 1] float32."""
  args, kwargs = _inputs(batch)
  return model(*args, **kwargs)


def _dummy_batch(model: nnx.Module) -> dict:
  """Shape-only sample input (qwix must call an NNX model once to quantize it)."""
  cfg = model.config
  vision = getattr(cfg, "vision", None)
  length = max(1, min(8, cfg.max_seq_len - (vision.num_tokens if vision is not None else 0)))
  batch = {"inputs": jnp.zeros((1, length), jnp.int32)}
  if vision is not None and hasattr(model, "vision"):
    batch["image"] = jnp.zeros((1, vision.image_size, vision.image_size, vision.channels),
                               jnp.uint8)
  return batch


def _quantize(model, provider, batch=None, **extra):
  args, kwargs = _inputs(batch) if batch is not None else ((), {})
  return qwix.quantize_model(model, provider, *args, **kwargs, **extra)


# qwix quantizes an NNX model by calling it once, eagerly. Eager JAX compiles every primitive
# on first use (~10 s for the tiny GPT on 2 CPU cores), so we never run that call for real:
# `nnx.eval_shape` traces it (giving the quantized *structure*, abstract), and the values are
# filled in by `qwix.quantize_params` (one jitted call) or copied from the source model.
def _abstract_quantize(model, provider, batch) -> nnx.Module:
  return nnx.eval_shape(lambda m, b: _quantize(m, provider, b), model, batch)


def _check_concrete(model: nnx.Module, what: str) -> nnx.Module:
  missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(
      nnx.state(model)) if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise RuntimeError(f"{what}: no value for {missing[:5]} ({len(missing)} leaves)")
  return model


def _materialize(abstract_q: nnx.Module, float_state: dict, quant_stats: dict) -> nnx.Module:
  """Fill an abstract PTQ model: ``quantize_params(float_state, abstract_q, quant_stats)``.

  ``float_state``: pure dict of the float model's state (params, and e.g. RNG counts, which
  pass through unchanged). ``quant_stats`` are closed over, not traced: quantize_params
  checks their counts in Python.
  """
  quant_stats = jax.tree.map(np.asarray, quant_stats)  # host values: compared in Python
  # quantize_params makes static activation scales float32 (from the float32 statistics),
  # whereas the PTQ model expects its activations' dtype (bf16 for a bf16 model) and
  # rejects a mismatch at call time: cast to the template's dtypes.
  want = {k: v.dtype for k, v in traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(abstract_q))).items()}

  def fill(p):
    flat = traverse_util.flatten_dict(qwix.quantize_params(p, abstract_q, quant_stats))
    for k, v in flat.items():
      if k in want and want[k] != v.dtype and jnp.issubdtype(v.dtype, jnp.floating):
        flat[k] = v.astype(want[k])
    return traverse_util.unflatten_dict(flat)

  nnx.update(abstract_q, jax.jit(fill)(float_state))
  return _check_concrete(abstract_q, "quantize_params")


def _zero_stats(model: nnx.Module) -> None:
  """Materialise abstract quant_stats as qwix initialises them: count 0, sums 0."""
  nnx.update(model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 nnx.state(model, qwix.QuantStat)))


def _float_state(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Not(qwix.QuantStat)))


def _quant_stats(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, qwix.QuantStat))


# -------------------------------------------------------------------------------------------
# Rules


def check_qtype(qtype, what: str = "qtype") -> Optional[str]:
  """``None`` or one of ``QTYPES``; anything else is a ValueError naming it."""
  if qtype is None:
    return None
  name = qtype if isinstance(qtype, str) else getattr(jnp.dtype(qtype), "name", str(qtype))
  if name not in QTYPES:
    raise ValueError(f"{what}={qtype!r} is not a supported quantization type: allowed "
                     f"values are {', '.join(map(repr, QTYPES))}")
  return name


def _path(path: tuple) -> str:
  return "/".join(map(str, path))


def _is_head(module) -> bool:
  axes = logical_axes(module.kernel) if isinstance(module.kernel, nnx.Variable) else None
  return bool(axes) and "vocab" in axes


def matmul_modules(model: nnx.Module, *, include_head: bool = False) -> list[tuple[str, Any]]:
  """(qwix path, module) of every ``Dense``/``nnx.Linear`` (``dot_general`` on a kernel).

  The untied LM head (kernel axes contain ``'vocab'``) counts as an output embedding and is
  left out unless ``include_head``.
  """
  out = []
  for path, m in nnx.iter_modules(model):
    if isinstance(m, (Dense, nnx.Linear)) and (include_head or not _is_head(m)):
      out.append((_path(path), m))
  return out


def conv_modules(model: nnx.Module) -> list[tuple[str, Any]]:
  return [(_path(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]


def _regex(paths: Iterable[str]) -> str:
  return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


def _group_tiles(name: str, in_shape: tuple[int, ...], group_size: int) -> dict[int, int]:
  """qwix ``tile_size`` mapping {kernel axis: tile} giving groups of ``group_size``
  consecutive weights of the flattened reduction (kernel axes ``0..len(in_shape)-1``).

  Innermost reduction axes that fit inside a group are reduced whole (not tiled); the axis
  where the group ends is tiled; outer reduction axes get tile 1 (one scale per index).
  E.g. (N=4, H=16) with group 32 -> {0: 2}: 2 heads x 16 per group.
  """
  if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
    raise ValueError(f"group_size={group_size!r} is invalid: must be a positive integer")
  total = math.prod(in_shape)
  rem, tiles = group_size, {}
  for ax in reversed(range(len(in_shape))):
    size = in_shape[ax]
    if rem == 1:
      tiles[ax] = 1
    elif rem >= size and rem % size == 0:
      rem //= size
    elif rem < size and size % rem == 0:
      tiles[ax], rem = rem, 1
    else:
      break
  if rem != 1 or total % group_size:
    raise ValueError(
        f"group_size={group_size} does not divide the reduction of {name!r}: its kernel "
        f"contracts over dims {in_shape} ({total} weights per output), which must split "
        f"into whole groups (choose a group_size dividing {in_shape[-1]}, or a multiple of "
        f"it dividing {total})")
  return tiles


def default_rules(model: nnx.Module, *, weight_qtype="int8", act_qtype=None,
                  act_static_scale: bool = False, group_size: Optional[int] = None,
                  include_head: bool = False) -> list[qwix.QuantizationRule]:
  """qwix rules for the matmul (and, when weights and activations share a qtype, conv)
  layers of ``model``; embeddings, positions, norms and attention's einsums stay float.

  qwix's PTQ conv needs ``act_qtype == weight_qtype`` (and QT conv has no tiling), so convs
  are quantized only in that case (int8 w+a), otherwise left float.
  """
  weight_qtype = check_qtype(weight_qtype, "weight_qtype")
  act_qtype = check_qtype(act_qtype, "act_qtype")
  if weight_qtype is None:
    raise ValueError("weight_qtype=None: qwix quantizes an op only when its rule has a "
                     "weight_qtype (activation-only quantization is not supported)")
  if act_static_scale and act_qtype is None:
    raise ValueError("act_static_scale=True needs act_qtype (static activation scales)")
  if group_size is not None and act_qtype is not None:
    raise ValueError("group_size (sub-channel weight groups) is for weight-only "
                     "quantization: qwix would tile the activations' axes the same way")
  act = dict(act_qtype=act_qtype)
  if act_qtype is not None:
    act["act_static_scale"] = bool(act_static_scale)
  mats = matmul_modules(model, include_head=include_head)
  rules = []
  if group_size is None:
    if mats:
      # Activations are (B, T, ...): batch and time are both "batch" axes for static scales.
      rules.append(qwix.QuantizationRule(
          module_path=_regex(p for p, _ in mats), op_names=("dot_general",),
          weight_qtype=weight_qtype, act_batch_axes=(0, 1), **act))
  else:
    # One rule per tiling (qwix's tile_size mapping is in kernel axes).
    by_tiles: dict[tuple, list[str]] = {}
    for p, m in mats:
      tiles = _group_tiles(p, tuple(m.kernel.shape[:m.n_in] if isinstance(m, Dense)
                                     else m.kernel.shape[:1]), group_size)
      by_tiles.setdefault(tuple(sorted(tiles.items())), []).append(p)
    for tiles, paths in by_tiles.items():
      rules.append(qwix.QuantizationRule(
          module_path=_regex(paths), op_names=("dot_general",), weight_qtype=weight_qtype,
          tile_size=dict(tiles) if tiles else None, act_batch_axes=(0, 1), **act))
  convs = conv_modules(model)
  if convs and act_qtype == weight_qtype and group_size is None:
    # Dynamic (per-image) activation scales for convs: qwix 0.1.8's QT conv collects its
    # statistics inside a custom_vjp, where NNX refuses the module mutation
    # (TraceContextError), so static conv scales cannot be calibrated.
    rules.append(qwix.QuantizationRule(
        module_path=_regex(p for p, _ in convs), op_names=("conv_general_dilated",),
        weight_qtype=weight_qtype, act_qtype=act_qtype, act_static_scale=False))
  if not rules:
    raise ValueError(f"{type(model).__name__} has no Dense/Linear/Conv layer to quantize")
  return rules


def _qt_rule(rule: qwix.QuantizationRule) -> qwix.QtRule:
  """The QT version of a rule; matmul activations calibrated per tensor (see module doc)."""
  fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(qwix.QuantizationRule)}
  extra = {}
  if rule.act_qtype is not None and rule.act_static_scale and (
      not rule.op_names or "conv_general_dilated" not in rule.op_names):
    extra["additional_qt_config"] = {"lhs_disable_channelwise_axes": True}
  return qwix.QtRule(**fields, **extra)


def _check_callable(q_model: nnx.Module, batch) -> None:
  """Trace one forward of a PTQ model (no compute) to fail early with a clear message."""
  try:
    jax.eval_shape(lambda: _call(q_model, batch))
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


# -------------------------------------------------------------------------------------------
# PTQ


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
  batches = _batches(calibration_batches)
  if not weights:
    raise ValueError("weights=False is not supported: qwix quantizes an op only when its "
                     "rule has a weight_qtype (no activation-only quantization)")
  if rules is None:
    rules = default_rules(model, weight_qtype="int8",
                          act_qtype="int8" if activations else None,
                          act_static_scale=activations and static_activations,
                          include_head=include_head)
  rules = list(rules)
  for r in rules:
    check_qtype(r.weight_qtype, "weight_qtype")
    check_qtype(r.act_qtype, "act_qtype")
  stats = {}
  if any(r.act_static_scale for r in rules):
    # Calibration: a QT model (same rules) accumulates each op's activation absmax in
    # quant_stats (count + sum) over the batches, all in one compiled forward.
    qt = _abstract_quantize(model, qwix.QtProvider([_qt_rule(r) for r in rules]), batches[0])
    nnx.update(qt, nnx.state(model))
    _zero_stats(qt)
    observe = nnx.jit(lambda m, b: _call(m, b))
    for b in batches:
      observe(_check_concrete(qt, "calibration model"), b)
    stats = _quant_stats(qt)
  q_model = _materialize(_abstract_quantize(model, qwix.PtqProvider(rules), batches[0]),
                         _float_state(model), stats)
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
  if rules is None:
    rules = default_rules(model, weight_qtype=weight_qtype, group_size=group_size,
                          include_head=include_head)
  batch = sample_batch if sample_batch is not None else _dummy_batch(model)
  q_model = _materialize(_abstract_quantize(model, qwix.PtqProvider(list(rules)), batch),
                         _float_state(model), {})
  _check_callable(q_model, batch)
  return q_model


# -------------------------------------------------------------------------------------------
# QAT


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
  if rules is None:
    rules = default_rules(model, weight_qtype=weight_qtype, act_qtype=act_qtype,
                          act_static_scale=act_static_scale, include_head=include_head)
  rules = list(rules)
  provider = qwix.QtProvider([_qt_rule(r) for r in rules])
  if any(r.act_static_scale for r in rules):
    # Static scales need their quant_stats variables, which qwix creates in the first call.
    batch = sample_batch if sample_batch is not None else _dummy_batch(model)
    q = _abstract_quantize(model, provider, batch)
    nnx.update(q, nnx.state(model))
    _zero_stats(q)
    _check_concrete(q, "qat_model")
  else:
    q = _quantize(model, provider, skip_nnx_init=True)  # nothing to create: no model call
  # On the class (created per quantize_model call), not the instance: instance attributes
  # would enter the graphdef, which must stay hashable.
  type(q)._gptjax_ptq_rules = tuple(rules)
  return q


_QAT_KEYS = ("enabled", "weight_qtype", "act_qtype", "act_static_scale", "include_head")


def maybe_qat(model: nnx.Module, cfg_flag_or_dict) -> nnx.Module:
  """``model`` unchanged for a false/None flag, ``qat_model(model)`` for True, or
  ``qat_model(model, **options)`` for a mapping (``enabled`` defaults to True; other keys:
  weight_qtype, act_qtype, act_static_scale, include_head). For a training config flag."""
  opts = cfg_flag_or_dict
  if opts is None or opts is False:
    return model
  if opts is True:
    return qat_model(model)
  if hasattr(opts, "to_dict"):  # ml_collections.ConfigDict
    opts = opts.to_dict()
  if not isinstance(opts, Mapping):
    raise ValueError(f"QAT setting {cfg_flag_or_dict!r} is invalid: expected a bool, None or "
                     f"a mapping with keys {', '.join(_QAT_KEYS)}")
  unknown = sorted(set(opts) - set(_QAT_KEYS))
  if unknown:
    raise ValueError(f"unknown QAT option(s) {unknown}: allowed keys are {', '.join(_QAT_KEYS)}")
  opts = dict(opts)
  if not opts.pop("enabled", True):
    return model
  return qat_model(model, **opts)


def _pure(tree) -> dict:
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


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
    params, stats = _float_state(qat), _quant_stats(qat)
    if ptq_model is None:
      rules = getattr(type(qat), "_gptjax_ptq_rules", None)
      if rules is None:
        raise ValueError("qat was not made by qat_model(): pass ptq_model")
      batch = sample_batch if sample_batch is not None else _dummy_batch(qat)
      return _materialize(_abstract_quantize(qat, qwix.PtqProvider(list(rules)), batch),
                          params, stats)
  else:
    if ptq_model is None:
      raise ValueError("converting QAT parameters (not a model) needs ptq_model: a PTQ model "
                       "with the same architecture and rules")
    params, stats = _pure(qat), {}
  # A concrete template keeps its values for what params do not cover (e.g. RNG state).
  return _materialize(nnx.clone(ptq_model), params, stats)


# -------------------------------------------------------------------------------------------
# Sizes and storage


def _nbytes(x) -> float:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x).nbytes
  dtype = jnp.dtype(x.dtype)
  return x.size * (0.5 if dtype in _INT4_DTYPES else dtype.itemsize)


def state_bytes(model_or_tree) -> float:
  """Sum of array sizes (a model: its whole state), int4 counted as 0.5 byte per element."""
  tree = nnx.state(model_or_tree) if isinstance(model_or_tree, nnx.Module) else model_or_tree
  return sum(_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def bytes_on_disk(path) -> int:
  """Total size of the files under ``path`` (or of the file ``path``)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


# orbax (tensorstore zarr, dtype "int4") stores int4 unpacked, one byte per element (an
# uncompressed tensorstore write of 1M int4 takes 1,048,738 bytes); orbax's default zstd then
# happens to squeeze the empty nibble out, but that depends on the compressor. We pack two
# int4 per uint8 so the stored array really is 0.5 byte per weight.
def pack_int4(x: jax.Array) -> jax.Array:
  """int4 array -> flat uint8 array of ceil(size / 2): element 2i in the low nibble."""
  v = jnp.ravel(x).astype(jnp.int8).astype(jnp.uint8) & 0xF
  if v.size % 2:
    v = jnp.concatenate([v, jnp.zeros((1,), jnp.uint8)])
  return (v[0::2] | (v[1::2] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, shape, dtype=jnp.int4) -> jax.Array:
  packed = jnp.asarray(packed, jnp.uint8)
  v = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:math.prod(shape)]
  signed = v.astype(jnp.int8)
  if jnp.dtype(dtype) == jnp.dtype(jnp.int4):
    signed = jnp.where(signed >= 8, signed - 16, signed)
  return signed.astype(dtype).reshape(shape)


def _to_storage(tree):
  return jax.tree.map(lambda x: pack_int4(x) if jnp.dtype(x.dtype) in _INT4_DTYPES else x, tree)


def _host_if_addressable(tree):
  """Fully addressable arrays -> NumPy. Why: orbax then writes no per-array sharding files
  (``_sharding``, ``array_metadatas``: ~45 % of a 100k-parameter artifact), and a deployment
  artifact is re-sharded on load anyway (``load_quantized`` restores with the target's
  shardings). Arrays spread over several hosts are saved as they are."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.tree.map(np.asarray, tree)
  return tree


def save_pytree(tree, directory) -> int:
  """Save a pytree of arrays with orbax's StandardCheckpointer (int4 leaves packed two per
  byte); returns the bytes written, measured on disk. ``directory`` must not exist."""
  directory = os.path.abspath(os.fspath(directory))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(directory, _host_if_addressable(_to_storage(_pure(tree))))
  ckpt.wait_until_finished()
  ckpt.close()
  return bytes_on_disk(directory)


def save_quantized(model: nnx.Module, directory) -> int:
  """Write the parameters of a (quantized) model -- int8/int4 ``qvalue`` s, float
  ``scale`` s (weights and static activations), float biases/norms/embeddings -- and return
  the real size on disk in bytes. RNG streams (dropout) are not saved."""
  return save_pytree(nnx.state(model, nnx.Param), directory)


def load_quantized(directory, target: nnx.Module) -> nnx.Module:
  """Restore ``save_quantized`` output into a copy of ``target``: a quantized model of the
  same architecture made the same way (e.g. ``int4_weight_only(GPT(cfg, rngs=...))``; its
  values are ignored). Returns the restored model."""
  model = nnx.clone(target)
  params = nnx.state(model, nnx.Param)
  tree = nnx.to_pure_dict(params)

  def abstract(x):
    sharding = getattr(x, "sharding", None)
    if jnp.dtype(x.dtype) in _INT4_DTYPES:
      return jax.ShapeDtypeStruct(((x.size + 1) // 2,), jnp.uint8, sharding=None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  ckpt = ocp.StandardCheckpointer()
  restored = ckpt.restore(os.path.abspath(os.fspath(directory)), jax.tree.map(abstract, tree))
  ckpt.close()

  def unpack(t, r):
    if jnp.dtype(t.dtype) not in _INT4_DTYPES:
      return r
    x = unpack_int4(r, t.shape, t.dtype)
    sharding = getattr(t, "sharding", None)
    return x if sharding is None else jax.device_put(x, sharding)

  restored = jax.tree.map(unpack, tree, restored)
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return model


# -------------------------------------------------------------------------------------------
# int8 embedding tables (asked for explicitly: the default keeps them float)
#
# Written by hand: qwix intercepts matmuls and convolutions, and a table lookup is a gather.


class Int8Table(nnx.Module):
  """A (rows, D) table as int8 ``qvalue`` + one float32 ``scale`` per row (symmetric absmax)."""

  def __init__(self, table: jax.Array):
    t = jnp.asarray(table, jnp.float32)
    scale = jnp.max(jnp.abs(t), axis=1, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    self.qvalue = nnx.Param(jnp.clip(jnp.round(t / scale), -127, 127).astype(jnp.int8))
    self.scale = nnx.Param(scale)

  def rows(self, ids: jax.Array) -> jax.Array:
    return (jnp.take(self.qvalue[...], ids, axis=0).astype(jnp.float32)
            * jnp.take(self.scale[...], ids, axis=0))

  def dense(self) -> jax.Array:
    return self.qvalue[...].astype(jnp.float32) * self.scale[...]


class Int8Lookup(nnx.Module):
  """Drop-in for ``layers.embed.LearnedPositions`` (a row lookup) on an int8 table."""

  def __init__(self, table: jax.Array, dtype):
    self.table = Int8Table(table)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.table.rows(ids).astype(self.dtype)


class Int8Embed(Int8Lookup):
  """Drop-in for ``layers.embed.Embed``: the lookup and the tied ``attend``."""

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.table.dense().astype(self.dtype),
                      preferred_element_type=jnp.float32)


def quantize_embeddings(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` (a GPT / VLM, float or already qwix-quantized) whose token table
  and learned position table are int8 with per-row scales. Returns the new model."""
  from gptjax.layers.embed import Embed, LearnedPositions
  model = nnx.clone(model)
  decoder = getattr(model, "decoder", model)
  if not isinstance(getattr(decoder, "embed", None), Embed):
    raise ValueError(f"quantize_embeddings needs a GPT or VLM with a float Embed, got "
                     f"{type(model).__name__}")
  old = decoder.embed
  decoder.embed = _inherit_path(Int8Embed(old.embedding[...], old.dtype), old)
  if isinstance(getattr(decoder, "positions", None), LearnedPositions):
    old = decoder.positions
    decoder.positions = _inherit_path(Int8Lookup(old.table[...], old.dtype), old)
  return model


def _inherit_path(new: nnx.Module, old: nnx.Module) -> nnx.Module:
  """A qwix-quantized model tags every module with ``qwix_path`` (its rules match on it) and
  expects the tag on each module it sees called; the replacements take the old module's."""
  path = getattr(old, "qwix_path", None)
  if path is not None:
    new.qwix_path = path
    new.table.qwix_path = tuple(path) + ("table",)
  return new


_jit_call = nnx.jit(_call)


def quantized_forward_error(float_model: nnx.Module, q_model: nnx.Module, batch) -> float:
  """Relative L2 error ||q - f|| / ||f|| of the logits on ``batch`` (jitted forwards)."""
  ref = _jit_call(float_model, batch).astype(jnp.float32)
  out = _jit_call(q_model, batch).astype(jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
