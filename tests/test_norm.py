"""Norm's forward and ``normalize``'s hand-written backward (custom_vjp) against autodiff of
the plain formula, for LayerNorm and RMSNorm, with a non-trivial scale and bias."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.layers.norm import Norm, normalize


def _plain(x, scale, bias, eps, center):
  if center:
    x = x - x.mean(-1, keepdims=True)
  y = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale
  return y if bias is None else y + bias


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_value_and_grads_match_autodiff_of_the_formula(kind):
  rng = np.random.default_rng(0)
  d = 24
  norm = Norm(d, kind, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, d), jnp.float32)
  if norm.bias is not None:
    norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, d), jnp.float32)
  x = jnp.asarray(rng.normal(0.5, 2.0, (3, 5, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 5, d)), jnp.float32)  # a loss that weighs every output
  center = kind == "layernorm"

  def ours(x, scale, bias):
    return jnp.sum(normalize(x, scale, bias, norm.eps, center) * w)

  def ref(x, scale, bias):
    return jnp.sum(_plain(x, scale, bias, norm.eps, center) * w)

  bias = None if norm.bias is None else norm.bias[...]
  args = (x, norm.scale[...], bias)
  argnums = (0, 1, 2) if bias is not None else (0, 1)
  # The module's forward is the formula with its own parameters.
  np.testing.assert_allclose(np.asarray(norm(x)), np.asarray(_plain(*args, norm.eps, center)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-5)
  for a, b in zip(jax.grad(ours, argnums)(*args), jax.grad(ref, argnums)(*args)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_norm_keeps_the_activation_dtype():
  norm = Norm(8, rngs=nnx.Rngs(0))
  y = norm(jnp.ones((2, 8), jnp.bfloat16) * jnp.arange(8, dtype=jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
