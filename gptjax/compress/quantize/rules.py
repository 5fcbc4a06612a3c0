"""Which ops qwix quantizes, and how: the qtypes we accept, the modules our rules name, and
int4 group tiles.

qwix matches an intercepted op's module by *path regex* (``'blocks/0/attn/q'``: the
``nnx.iter_modules`` path joined by ``/``). We list our ``Dense``/``nnx.Linear``/``nnx.Conv``
modules explicitly, so nothing else is hit: embeddings, positions and norms stay float (a
quantized tied table would also break the ``jnp.take`` lookup), and so do attention's
activation x activation einsums (module ``.../attn``).

int4 groups over multi-axis reductions (attention ``o``: kernel (N, H, D), contraction over
(N, H)): qwix's integer ``tile_size`` only tiles the innermost contracting axis, so a group
wider than H is written as a per-module ``tile_size`` mapping (``group_tiles``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Optional

import jax.numpy as jnp
import qwix
from flax import nnx

from gptjax.layers.linear import Dense
from gptjax.tree import path_str, variable_axes

QTYPES = ("int8", "int4")


def check_qtype(qtype, what: str = "qtype") -> Optional[str]:
  """``None`` or one of ``QTYPES``; anything else is a ValueError naming it."""
  if qtype is None:
    return None
  name = qtype if isinstance(qtype, str) else getattr(jnp.dtype(qtype), "name", str(qtype))
  if name not in QTYPES:
    raise ValueError(f"{what}={qtype!r} is not a supported quantization type: allowed "
                     f"values are {', '.join(map(repr, QTYPES))}")
  return name


def _is_head(module) -> bool:
  axes = variable_axes(module.kernel)
  return bool(axes) and "vocab" in axes


def matmul_modules(model: nnx.Module, *, include_head: bool = False) -> list[tuple[str, Any]]:
  """(qwix path, module) of every ``Dense``/``nnx.Linear`` (``dot_general`` on a kernel).

  The untied LM head (kernel axes contain ``'vocab'``) counts as an output embedding and is
  left out unless ``include_head``.
  """
  out = []
  for path, m in nnx.iter_modules(model):
    if isinstance(m, (Dense, nnx.Linear)) and (include_head or not _is_head(m)):
      out.append((path_str(path, sep="/"), m))
  return out


def conv_modules(model: nnx.Module) -> list[tuple[str, Any]]:
  """(qwix path, module) of every ``nnx.Conv``."""
  return [(path_str(p, sep="/"), m) for p, m in nnx.iter_modules(model)
          if isinstance(m, nnx.Conv)]


def _regex(paths: Iterable[str]) -> str:
  return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


def group_tiles(name: str, in_shape: tuple[int, ...], group_size: int) -> dict[int, int]:
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


def _reduction_shape(m) -> tuple[int, ...]:
  """The kernel dims a matmul module contracts over."""
  return tuple(m.kernel.shape[:m.n_in] if isinstance(m, Dense) else m.kernel.shape[:1])


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
      tiles = group_tiles(p, _reduction_shape(m), group_size)
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


def check_rules(rules) -> list[qwix.QuantizationRule]:
  """``rules`` as a list, every qtype in it one of ``QTYPES``."""
  rules = list(rules)
  for r in rules:
    check_qtype(r.weight_qtype, "weight_qtype")
    check_qtype(r.act_qtype, "act_qtype")
  return rules


def qt_rule(rule: qwix.QuantizationRule) -> qwix.QtRule:
  """The QT (fake-quant / calibration) version of a rule.

  Matmul activations with static scales are calibrated *per tensor*
  (``lhs_disable_channelwise_axes``). Why: qwix's statistic is the mean over calibration
  batches of the absmax, and with its default per-token channelwise axes that is the mean of
  per-token maxima, which clips every larger token (12 % logits error measured on the tiny
  GPT); per tensor it is the mean over batches of the batch absmax (2.7 %).
  """
  fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(qwix.QuantizationRule)}
  extra = {}
  if rule.act_qtype is not None and rule.act_static_scale and (
      not rule.op_names or "conv_general_dilated" not in rule.op_names):
    extra["additional_qt_config"] = {"lhs_disable_channelwise_axes": True}
  return qwix.QtRule(**fields, **extra)
