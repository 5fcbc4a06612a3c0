"""Parameters with logical axis names, and an einsum dense layer.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (one name per
dimension: ``embed``, ``heads``, ``head_dim``, ``mlp``, ``vocab`` ...). We deliberately do
not use Flax's ``out_sharding`` metadata: with NNX eager sharding it would try to place the
array on a mesh at construction time, whereas we want the model to be mesh-agnostic and let
``gptjax.sharding`` map logical names to mesh axes in one rule table (MaxText style).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

Axes = tuple  # tuple[str | None, ...]


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def logical_axes(variable: nnx.Variable) -> Axes | None:
  return variable.get_metadata().get("logical_axes")


class Dense(nnx.Module):
  """``y = einsum(x, W) + b`` over the last ``len(in_shape)`` dims of ``x``.

  Multi-dimensional kernels (e.g. (D, N, H) for attention projections) keep heads as a real
  axis so tensor parallelism can shard them by name without reshapes.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Axes, *,
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               init_scale: float = 1.0, rngs: nnx.Rngs):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = 1
    for s in in_shape:
      fan_in *= s
    # Normal(0, sqrt(scale/fan_in)) regardless of the kernel's rank: the same init as a
    # flattened (fan_in, fan_out) matrix.
    init = jax.nn.initializers.normal(stddev=(init_scale / fan_in) ** 0.5)
    self.kernel = param(rngs, init, in_shape + out_shape, axes, param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, out_shape, axes[len(in_shape):],
                       param_dtype) if use_bias else None)
    self.n_in = len(in_shape)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    # promote_dtype (as nnx.Linear does) rather than .astype: qwix swaps a quantized kernel
    # for a QArray wrapper that intercepts this cast, where .astype would fail.
    x, kernel, bias = dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    ndim_out = kernel.ndim - self.n_in
    y = jax.lax.dot_general(
        x, kernel,
        ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ())))
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - ndim_out) + bias.shape)
    return y
