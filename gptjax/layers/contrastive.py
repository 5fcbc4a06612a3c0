"""A SigLIP contrastive head (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training"): pooled image and text features -> unit vectors, and the pairwise sigmoid loss.

Shapes: B rows, D the decoder width, C = ``contrastive_dim``.

Why the sigmoid loss rather than CLIP's softmax: every (image, text) pair is its own binary
problem, so several positives per row (identical captions, frequent in ``shapes``) need no
special normalisation — a pair is simply labelled +1.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.layers.linear import Dense

INIT_LOG_TEMPERATURE = math.log(10.0)  # SigLIP's init: t = 10
INIT_BIAS = -10.0  # starts every pair well on the negative side (most pairs are negatives)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class ContrastiveHead(nnx.Module):
  """Two linear maps D -> C (image side, text side), a learned log temperature and bias."""

  def __init__(self, width: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The contrastive dim is small: replicated (logical axis None), the input sharded like
    # every other 'embed' dimension.
    self.image_proj = Dense((width,), (dim,), ("embed", None), **kw)
    self.text_proj = Dense((width,), (dim,), ("embed", None), **kw)
    self.log_temperature = nnx.Param(jnp.asarray(INIT_LOG_TEMPERATURE, jnp.float32),
                                     logical_axes=())
    self.bias = nnx.Param(jnp.asarray(INIT_BIAS, jnp.float32), logical_axes=())

  def image(self, pooled: jax.Array) -> jax.Array:
    """(B, D) pooled image features -> (B, C) unit vectors (float32)."""
    return l2_normalize(self.image_proj(pooled))

  def text(self, pooled: jax.Array) -> jax.Array:
    """(B, D) pooled text features -> (B, C) unit vectors (float32)."""
    return l2_normalize(self.text_proj(pooled))

  def loss(self, x: jax.Array, y: jax.Array, positive: jax.Array,
           valid: Optional[jax.Array] = None) -> jax.Array:
    return siglip_loss(x, y, positive, self.log_temperature[...], self.bias[...], valid)


def siglip_loss(x: jax.Array, y: jax.Array, positive: jax.Array, log_t: jax.Array,
                b: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
  """-mean over pairs (i, j) of log sigmoid(z_ij * (t * x_i . y_j + b)), t = exp(log_t).

  ``x`` (B, C) image and ``y`` (B, C) text embeddings (unit norm); ``positive`` (B, B) bool,
  z_ij = +1 where True (a matching pair), else -1; ``valid`` (B,) bool: rows that take part
  (the mean runs over pairs of valid rows; a batch without any gives 0).
  """
  logits = jnp.exp(log_t) * jnp.einsum("ic,jc->ij", x.astype(jnp.float32),
                                       y.astype(jnp.float32)) + b
  z = jnp.where(positive, 1.0, -1.0)
  pair_loss = -jax.nn.log_sigmoid(z * logits)
  if valid is None:
    return jnp.mean(pair_loss)
  w = (valid[:, None] & valid[None, :]).astype(jnp.float32)
  return jnp.sum(pair_loss * w) / jnp.maximum(jnp.sum(w), 1.0)
