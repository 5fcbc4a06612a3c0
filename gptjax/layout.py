"""The decoder's two parameter layouts and the conversions between them, on a model or on
any tree that mirrors its state (parameters, optimizer moments, pruning masks, pure dicts,
abstract restore targets).

* **loop** (``ModelConfig.scan_layers=False``): ``blocks`` holds the u unique blocks
  separately, ``blocks/0/attn/q/kernel`` ... (what GPT-2 import / export, structured
  pruning and quantization rules name).
* **scan** (``scan_layers=True``): ``blocks`` is one block whose arrays have a leading
  ``layers`` axis of size u, ``blocks/attn/q/kernel`` of shape (u, D, N, H): what
  ``jax.lax.scan`` consumes, and one array per parameter kind for the optimizer.

A decoder's state is recognised as a mapping holding both ``blocks`` and ``final_norm``
(the vision encoder's blocks, which never scan, sit beside a ``norm``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from gptjax.layers.stacked import num_stacked, slice_tree, stack_trees


def _is_decoder(x) -> bool:
  return isinstance(x, Mapping) and "blocks" in x and "final_norm" in x


def _block_index(k):
  """A separate block's key (int, or its string form in a restored pure dict), else None."""
  if isinstance(k, int):
    return k
  if isinstance(k, str) and k.isdigit():
    return int(k)
  return None


def is_scan_layout(blocks: Mapping) -> bool:
  """Whether a decoder's ``blocks`` mapping is the stacked (scan) layout."""
  return not all(_block_index(k) is not None for k in blocks)


def _raw(x):
  # nnx.State keeps plain nested dicts inside and wraps them only on access: conversions
  # work on (and rebuild) the plain dicts, so the tree structure matches a State's own.
  return x.raw_mapping if isinstance(x, nnx.State) else x


def _convert_decoder(node: Mapping, scan: bool):
  raw = _raw(node)
  blocks = _raw(raw["blocks"])
  if is_scan_layout(blocks) == scan:
    return node
  if scan:
    new = stack_trees([blocks[k] for k in sorted(blocks, key=_block_index)])
  else:
    new = {i: slice_tree(blocks, i) for i in range(num_stacked(blocks))}
  items = {**raw, "blocks": new}
  return nnx.State(items) if isinstance(node, nnx.State) else type(node)(items)


def _map_decoders(tree: Any, target) -> Any:
  """``tree`` with every decoder state converted to ``target(node)`` (True: scan)."""
  return jax.tree.map(lambda x: _convert_decoder(x, target(x)) if _is_decoder(x) else x,
                      tree, is_leaf=_is_decoder)


def to_layout(tree: Any, scan: bool) -> Any:
  """``tree`` with every decoder state in it converted to the scan (stacked) or loop
  (separate blocks) layout; already converted ones, and everything else, unchanged."""
  return _map_decoders(tree, lambda _: scan)


def flip_layout(tree: Any) -> Any:
  """``tree`` with every decoder state in it converted to the layout it is not in."""
  return _map_decoders(tree, lambda x: not is_scan_layout(_raw(x["blocks"])))


def has_decoder(tree: Any) -> bool:
  """Whether ``tree`` holds a decoder state (something a layout conversion would change)."""
  return any(_is_decoder(x) for x in jax.tree.leaves(tree, is_leaf=_is_decoder))


def with_layout(model: nnx.Module, scan: bool) -> nnx.Module:
  """``model`` (a ``GPT`` or ``VLM``) rebuilt in the other layout, with the same weights
  and ``config.scan_layers=scan``; itself if it already is."""
  cfg = getattr(model, "config", None)
  if cfg is None or not hasattr(cfg, "scan_layers"):
    raise TypeError(f"with_layout needs a gptjax GPT or VLM, got {type(model).__name__}")
  if cfg.scan_layers == scan:
    return model
  new_cfg = dataclasses.replace(cfg, scan_layers=scan)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, to_layout(nnx.state(model), scan))


def loop_layout(model: nnx.Module) -> nnx.Module:
  """``model`` with its blocks separate (what per-block transforms name: structured
  pruning, quantization rules, GPT-2 export); itself if it is, or is not a gptjax GPT /
  VLM (a wrapper, a quantized model)."""
  if getattr(getattr(model, "config", None), "scan_layers", False):
    return with_layout(model, False)
  return model
