"""LayerNorm and RMSNorm, normalised in float32 whatever the activation dtype."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.layers.linear import param


# A hand-written backward: XLA's autodiff of the normalisation recomputes the centred input
# and its statistics in several separate reductions; this one saves x_hat and 1/std and
# needs two row means. Measured on a 2-core Xeon, same-process interleaved A/B of the real
# train step: 4x128 T 64 B 12 53.2 -> 46.1 ms, mini T 256 B 8 89.3 -> 83.4 ms.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x, scale, bias, eps: float, center: bool):
  """float32 x (..., D) -> (x - mean if center) / std * scale (+ bias)."""
  return _normalize_fwd(x, scale, bias, eps, center)[0]


def _normalize_fwd(x, scale, bias, eps, center):
  if center:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  xhat = x * rstd
  y = xhat * scale
  if bias is not None:
    y = y + bias
  return y, (xhat, rstd, scale, bias)


def _normalize_bwd(eps, center, res, dy):
  del eps
  xhat, rstd, scale, bias = res
  rows = tuple(range(dy.ndim - 1))
  g = dy * scale
  dx = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
  if center:
    dx = dx - jnp.mean(g, axis=-1, keepdims=True)
  return dx * rstd, jnp.sum(dy * xhat, rows), jnp.sum(dy, rows) if bias is not None else None


normalize.defvjp(_normalize_fwd, _normalize_bwd)


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
    bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
    y = normalize(x.astype(jnp.float32), self.scale[...].astype(jnp.float32), bias,
                  float(self.eps), self.kind == "layernorm")
    return y.astype(x.dtype)
