"""int8 embedding tables: the token table (lookup and tied ``attend``) and the learned
position table as int8 with one float32 scale per row. Asked for explicitly (the default
rules keep them float).

Written by hand, without qwix: qwix intercepts matmuls and convolutions, and a table lookup
is a gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.layers.embed import Embed, LearnedPositions


class Int8Table(nnx.Module):
  """A (rows, D) table as int8 ``qvalue`` + one float32 ``scale`` per row (symmetric absmax)."""

  def __init__(self, table: jax.Array):
    t = jnp.asarray(table, jnp.float32)
    scale = jnp.max(jnp.abs(t), axis=1, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    self.qvalue = nnx.Param(jnp.clip(jnp.round(t / scale), -127, 127).astype(jnp.int8))
    self.scale = nnx.Param(scale)

  def rows(self, ids: jax.Array) -> jax.Array:
    return (jnp.take(self.qvalue[...], ids, axis=0).astype(jnp.float32)
            * jnp.take(self.scale[...], ids, axis=0))

  def dense(self) -> jax.Array:
    return self.qvalue[...].astype(jnp.float32) * self.scale[...]


class Int8Lookup(nnx.Module):
  """Drop-in for ``layers.embed.LearnedPositions`` (a row lookup) on an int8 table."""

  def __init__(self, table: jax.Array, dtype):
    self.table = Int8Table(table)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.table.rows(ids).astype(self.dtype)


class Int8Embed(Int8Lookup):
  """Drop-in for ``layers.embed.Embed``: the lookup and the tied ``attend``."""

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.table.dense().astype(self.dtype),
                      preferred_element_type=jnp.float32)


def _inherit_path(new: nnx.Module, old: nnx.Module) -> nnx.Module:
  """A qwix-quantized model tags every module with ``qwix_path`` (its rules match on it) and
  expects the tag on each module it sees called; the replacements take the old module's."""
  path = getattr(old, "qwix_path", None)
  if path is not None:
    new.qwix_path = path
    new.table.qwix_path = tuple(path) + ("table",)
  return new


def quantize_embeddings(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` (a GPT / VLM, float or already qwix-quantized) whose token table
  and learned position table are int8 with per-row scales. Returns the new model."""
  model = nnx.clone(model)
  decoder = getattr(model, "decoder", model)
  if not isinstance(getattr(decoder, "embed", None), Embed):
    raise ValueError(f"quantize_embeddings needs a GPT or VLM with a float Embed, got "
                     f"{type(model).__name__}")
  old = decoder.embed
  decoder.embed = _inherit_path(Int8Embed(old.embedding[...], old.dtype), old)
  if isinstance(getattr(decoder, "positions", None), LearnedPositions):
    old = decoder.positions
    decoder.positions = _inherit_path(Int8Lookup(old.table[...], old.dtype), old)
  return model
