"""LayerNorm and RMSNorm, normalised in float32 whatever the activation dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.layers.linear import param


class Norm(nnx.Module):
  """``kind``: 'layernorm' (mean/variance, scale + bias) or 'rmsnorm' (scale only)."""

  def __init__(self, dim: int, kind: str = "layernorm", *, eps: float = 1e-5,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.kind = kind
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",), param_dtype)
                 if kind == "layernorm" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    x = x * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(dtype)
