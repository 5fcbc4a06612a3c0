"""Which leaves are prunable kernels, which are embeddings, and their reduction dims -- all
read from ``logical_axes`` metadata (see the package docstring for the rules) -- plus the
flatten / rebuild plumbing the mask and surgery code shares, and argument checks."""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.tree import is_variable, path_names, variable_axes

# A kernel's input (reduction) axes end at the conv's input channels ...
CONV_IN_AXIS = "conv_in"
# ... or, when it starts with a head axis followed by head_dim, after those two: the
# attention output projection (heads, head_dim, embed). A leaf that is *only* such axes
# (the (heads, head_dim) q/k/v biases) has no output dim left, so it is not a kernel.
HEAD_AXES = ("heads", "kv_heads")
HEAD_DIM_AXIS = "head_dim"
# Embeddings: the token table (vocab, embed), the untied LM head (embed, vocab), and the
# learned position tables (position, embed) / the ViT's (position, vision_embed).
EMBEDDING_AXES = frozenset({"vocab", "position"})


# ------------------------------------------------------------------------------ leaves
def _axes_of(x, axes):
  if axes is None and is_variable(x):
    return variable_axes(x)
  return tuple(axes) if axes is not None else None


def _array_of(x):
  if is_variable(x):
    leaves = jax.tree.leaves(x)
    return leaves[0] if len(leaves) == 1 else None
  return x


def _shape(v) -> tuple:
  return tuple(v.shape) if hasattr(v, "shape") else np.shape(v)


def _is_float(v) -> bool:
  dtype = v.dtype if hasattr(v, "dtype") else jnp.result_type(v)
  return jnp.issubdtype(dtype, jnp.floating)


def is_embedding(axes) -> bool:
  """True for an embedding: its logical axes contain ``'vocab'`` or ``'position'``.
  ``axes``: the ``logical_axes`` tuple, or a Variable (its metadata is read); an array or
  None (no metadata) is never an embedding."""
  if is_variable(axes):
    axes = variable_axes(axes)
  if axes is None or hasattr(axes, "shape"):
    return False
  return any(a in EMBEDDING_AXES for a in axes)


def reduction_ndim(x, axes: Optional[Sequence] = None) -> int:
  """How many leading dims of kernel ``x`` (a Variable, or an array with optional ``axes``)
  are its input (fan-in / reduction) dims.

  With logical axes: up to and including ``'conv_in'`` (conv (kh, kw, Cin, Cout): 3); 2
  when they start with (``'heads'`` | ``'kv_heads'``, ``'head_dim'``) (the attention
  output (N, H, D)); else 1 (Dense (D, F), q/k/v (D, N, H), ...). Without metadata: all
  but the last dim (``ndim - 1``: (in, out) -> 1, HWIO conv -> 3, (N, H, D) -> 2).
  """
  axes = _axes_of(x, axes)
  nd = len(_shape(_array_of(x)))
  if axes is None:
    return max(nd - 1, 1)
  if CONV_IN_AXIS in axes:
    return axes.index(CONV_IN_AXIS) + 1
  if len(axes) >= 2 and axes[0] in HEAD_AXES and axes[1] == HEAD_DIM_AXIS:
    return 2
  return 1


def is_kernel(x, axes: Optional[Sequence] = None) -> bool:
  """A floating array with at least one input and one output dim: ``ndim >
  reduction_ndim`` (so ndim >= 2). Biases and norm scales are not: 1-D, or the 2-D
  (heads, head_dim) attention biases, which are all reduction-like axes."""
  v = _array_of(x)
  if v is None:
    return False
  nd = len(_shape(v))
  return nd >= 2 and _is_float(v) and nd > reduction_ndim(x, axes)


def is_prunable(x, axes: Optional[Sequence] = None, *, include_embeddings: bool = False) -> bool:
  """A kernel (``is_kernel``) that is not an embedding (unless ``include_embeddings``).
  ``x``: a Variable (its ``logical_axes`` are used) or an array (``axes`` optional)."""
  axes = _axes_of(x, axes)
  if not is_kernel(x, axes):
    return False
  return include_embeddings or not is_embedding(axes)


# -------------------------------------------------------------------------------- trees
class Entry(NamedTuple):
  names: tuple  # path keys (str for dict keys / attributes, int for list indices)
  item: Any  # the Variable or the raw leaf
  value: Any  # the array (None when a Variable does not hold exactly one leaf)
  axes: Optional[tuple]  # logical_axes metadata, None without

  def prunable(self, include_embeddings: bool = False) -> bool:
    return is_prunable(self.value, self.axes, include_embeddings=include_embeddings)


def entries(tree):
  """([Entry] in flattening order, treedef); Variables are single leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  out = [Entry(path_names(path), item, _array_of(item), variable_axes(item))
         for path, item in flat]
  return out, treedef


def rebuild(treedef, ents, values):
  """The tree ``ents`` came from, with each entry's array replaced by ``values[i]``
  (Variables rebuilt with their metadata)."""
  items = [jax.tree.map(lambda _, v=v: v, e.item) if is_variable(e.item) else v
           for e, v in zip(ents, values)]
  return jax.tree_util.tree_unflatten(treedef, items)


# --------------------------------------------------------------------------- validation
def check_sparsity(sparsity, name: str = "sparsity") -> float:
  ok = (isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
        and not math.isnan(float(sparsity)) and 0.0 <= float(sparsity) < 1.0)
  if not ok:
    raise ValueError(f"{name}={sparsity!r} is invalid: must be a number in [0, 1)")
  return float(sparsity)


def check_int(name: str, value, lo: int, hi: Optional[int] = None, why: str = "") -> int:
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < lo
      or (hi is not None and value > hi)):
    rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{name}={value!r} is invalid: must be an integer {rng}{why}")
  return int(value)


def check_nm(n, m) -> tuple[int, int]:
  ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, m))
  if not ok or m < 1 or n < 1 or n > m:
    raise ValueError(f"n={n!r}, m={m!r} is invalid for N:M sparsity: need integers "
                     "with 1 <= n <= m")
  return int(n), int(m)
