"""Token embeddings (with the tied LM head) and positional encodings (learned, RoPE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.layers.linear import param

EMBED_INIT_STD = 0.02  # GPT-2's choice for token and position tables


class Embed(nnx.Module):
  """Token table (V, D). ``attend`` reuses it as the output projection (tied embeddings)."""

  def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(EMBED_INIT_STD)
    self.embedding = param(rngs, init, (vocab, dim), ("vocab", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    # Logits accumulate in float32 even for bf16 activations: the softmax over a large
    # vocabulary is where low precision hurts the loss first.
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class LearnedPositions(nnx.Module):
  """Position table (S_max, D). Its first axis is named ``'position'`` (replicated, see
  ``gptjax.sharding``) so pruning can tell it from a kernel by its axes."""

  def __init__(self, max_len: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(EMBED_INIT_STD)
    self.table = param(rngs, init, (max_len, dim), ("position", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, positions: jax.Array) -> jax.Array:
    return jnp.take(self.table[...], positions, axis=0).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotary embedding (Su et al. 2021), half-split (GPT-NeoX) layout.

  x: (B, T, N, H); positions: (T,) or (B, T) integer positions. Angles in float32.
  """
  h = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)  # (H/2,)
  pos = jnp.asarray(positions, jnp.float32)
  if pos.ndim == 1:
    pos = pos[None]
  angles = pos[..., None] * freqs  # (B|1, T, H/2)
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
