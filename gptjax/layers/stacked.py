"""A stack of identically shaped blocks held as ONE module whose parameters carry a leading
``layers`` axis (the layout ``jax.lax.scan`` consumes), and the conversions between that
and separate blocks.

Why stored stacks rather than stacking separate blocks inside the forward: the optimizer
(clipping, AdamW) compiles its update per parameter array, so separate blocks hand XLA
``depth`` times as many arrays to update. Measured on CPU (width 128, T 64, B 8, AdamW with
clipping): the train step of a 24-layer model compiled in 11.7 s with separate blocks
stacked in the forward and in 1.6 s with stored stacks, the same as a 2-layer model.

The helpers work on any leaf a model's state takes: ``nnx.Variable`` (its ``logical_axes``
gain / lose the leading ``layers`` name, so sharding rules see it), ``jax.Array``, NumPy
arrays and ``jax.ShapeDtypeStruct`` (abstract restore targets: the sharding gains / loses a
replicated leading dimension).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax.tree import is_variable, variable_axes

LAYERS = "layers"  # the logical name of the stacked axis (replicated by the sharding rules)


def _stack_values(vals: Sequence[Any]):
  v0 = vals[0]
  if isinstance(v0, jax.ShapeDtypeStruct):
    sh = v0.sharding
    if isinstance(sh, NamedSharding):
      sh = NamedSharding(sh.mesh, P(None, *sh.spec))
    return jax.ShapeDtypeStruct((len(vals),) + tuple(v0.shape), v0.dtype, sharding=sh)
  if isinstance(v0, np.ndarray):
    return np.stack(vals)
  return jnp.stack(vals)


def _slice_value(v, i: int):
  if isinstance(v, jax.ShapeDtypeStruct):
    sh = v.sharding
    if isinstance(sh, NamedSharding):
      sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
    return jax.ShapeDtypeStruct(tuple(v.shape[1:]), v.dtype, sharding=sh)
  return v[i]


def _stack_leaf(*xs):
  if not is_variable(xs[0]):
    return _stack_values(xs)
  axes = variable_axes(xs[0])
  meta = {} if axes is None else {"logical_axes": (LAYERS,) + axes}
  return xs[0].replace(_stack_values([x.get_value() for x in xs]), **meta)


def _slice_leaf(x, i: int):
  if not is_variable(x):
    return _slice_value(x, i)
  axes = variable_axes(x)
  meta = {} if axes is None else {"logical_axes": axes[1:]}
  return x.replace(_slice_value(x.get_value(), i), **meta)


def stack_trees(trees: Sequence[Any]) -> Any:
  """Identically structured trees (one per block) -> one tree of stacked leaves."""
  try:
    return jax.tree.map(_stack_leaf, *trees, is_leaf=is_variable)
  except ValueError as e:
    raise ValueError(f"blocks of different structure or shapes cannot be stacked: {e}") from e


def slice_tree(tree: Any, i: int) -> Any:
  """Block ``i`` of a stacked tree (the leading ``layers`` index)."""
  return jax.tree.map(lambda x: _slice_leaf(x, i), tree, is_leaf=is_variable)


def num_stacked(tree: Any) -> int:
  """The length of a stacked tree's leading axis."""
  leaf = jax.tree.leaves(tree)[0]
  return int(leaf.shape[0])


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """Separate blocks -> one module of their graph whose arrays are stacked (block i at
  index i)."""
  graphdef = nnx.graphdef(modules[0])
  if any(nnx.graphdef(m) != graphdef for m in modules[1:]):
    raise ValueError("blocks of different structure (e.g. pruned per layer) cannot be "
                     "stacked: set ModelConfig.scan_layers=False")
  return nnx.merge(graphdef, stack_trees([nnx.state(m) for m in modules]))


def module_slice(stacked: nnx.Module, i: int) -> nnx.Module:
  """Block ``i`` of a stacked module, as a module of its own (its arrays are slices)."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, slice_tree(state, i))
