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


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 along the last axis: (int8 values, float32 scale (..., 1)); x ~ q * s."""
  x = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  s = jnp.where(s == 0, 1.0, s)
  return jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8), s


class Int8Table(nnx.Module):
  """A (rows, D) table as int8 ``qvalue`` + one float32 ``scale`` per row (symmetric absmax)."""

  def __init__(self, table: jax.Array):
    qvalue, scale = quantize_rows(jnp.asarray(table, jnp.float32))
    self.qvalue = nnx.Param(qvalue)
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
  """Drop-in for ``layers.embed.Embed``: the lookup and the tied ``attend``.

  ``act_int8``: the tied head also quantizes its input, per token (dynamic symmetric absmax
  scale), and runs an int8 x int8 -> int32 dot: at GPT-2-small shape the head is a third of
  the weights and, on CPU, the integer dot is what makes batched decoding faster than float.
  """

  def __init__(self, table: jax.Array, dtype, act_int8: bool = False):
    super().__init__(table, dtype)
    self.act_int8 = bool(act_int8)

  def attend(self, x: jax.Array) -> jax.Array:
    # x . (q_v * s_v) = (x . q_v) * s_v: the dot reads the int8 table and the per-row scale
    # goes on the output, so no float copy of the (V, D) table is built per call (with it,
    # a GPT-2-small decode step read 4x the head's bytes and ran slower than float).
    t = self.table
    scale = t.scale[...][:, 0]
    if not self.act_int8:
      logits = jnp.einsum("...d,vd->...v", x.astype(self.dtype),
                          t.qvalue[...].astype(self.dtype), preferred_element_type=jnp.float32)
      return logits * scale
    xq, xs = quantize_rows(x)
    acc = jnp.einsum("...d,vd->...v", xq, t.qvalue[...], preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * xs * scale


def _inherit_path(new: nnx.Module, old: nnx.Module) -> nnx.Module:
  """A qwix-quantized model tags every module with ``qwix_path`` (its rules match on it) and
  expects the tag on each module it sees called; the replacements take the old module's."""
  path = getattr(old, "qwix_path", None)
  if path is not None:
    new.qwix_path = path
    new.table.qwix_path = tuple(path) + ("table",)
  return new


def quantize_embeddings(model: nnx.Module, *, head_activations: bool = False) -> nnx.Module:
  """A copy of ``model`` (a GPT / VLM, float or already qwix-quantized) whose token table
  and learned position table are int8 with per-row scales. ``head_activations``: the tied
  head's input is quantized per token too (``Int8Embed.act_int8``). Returns the new model."""
  model = nnx.clone(model)
  decoder = getattr(model, "decoder", model)
  if not isinstance(getattr(decoder, "embed", None), Embed):
    raise ValueError(f"quantize_embeddings needs a GPT or VLM with a float Embed, got "
                     f"{type(model).__name__}")
  old = decoder.embed
  decoder.embed = _inherit_path(Int8Embed(old.embedding[...], old.dtype, head_activations), old)
  if isinstance(getattr(decoder, "positions", None), LearnedPositions):
    old = decoder.positions
    decoder.positions = _inherit_path(Int8Lookup(old.table[...], old.dtype), old)
  return model
