"""Pytree key paths as names: one home for the helpers that pruning, sharding, checkpoint
checks and quantization use to name a parameter (``blocks.0.attn.q.kernel``)."""
from __future__ import annotations

from typing import Any, Iterable, Union

import jax
from flax import nnx

Name = Union[str, int]


def is_variable(x) -> bool:
  """An ``nnx.Variable`` (``nnx.Param`` ...): treated as one leaf, its metadata kept."""
  return isinstance(x, nnx.Variable)


def key_name(k) -> Name:
  """One key-path entry as a plain name: dict keys and attributes as they are (str),
  sequence indices as ints."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def path_names(path: Iterable) -> tuple[Name, ...]:
  return tuple(key_name(k) for k in path)


def path_str(names: Iterable, sep: str = ".") -> str:
  """('blocks', 0, 'attn') -> 'blocks.0.attn'; accepts a raw key path too."""
  return sep.join(str(key_name(n)) if not isinstance(n, (str, int)) else str(n)
                  for n in names)


def flat_dict(tree: Any, *, variables_as_leaves: bool = False) -> dict[str, Any]:
  """{'a.b.0.c': leaf} over ``tree`` (the names Orbax stores arrays under)."""
  is_leaf = is_variable if variables_as_leaves else None
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_str(path): x for path, x in flat}


def variable_axes(x) -> tuple | None:
  """The ``logical_axes`` metadata of a Variable (None for anything else / without)."""
  if not is_variable(x):
    return None
  axes = x.get_metadata().get("logical_axes")
  return tuple(axes) if axes is not None else None
