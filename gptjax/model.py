"""The GPT decoder (with cross-layer weight sharing) and the VLM built on it.

Shapes: B batch, T text tokens, P image tokens, S = P + T, D width, V vocab.
Used functionally at the jit boundary: ``graphdef, state = nnx.split(model)`` outside,
``nnx.merge(graphdef, state)`` inside the jitted function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.layers.attention import Attention, KVCache, LinearState
from gptjax.layers.embed import Embed, LearnedPositions
from gptjax.layers.linear import Dense
from gptjax.layers.mlp import MLP
from gptjax.layers.norm import Norm
from gptjax.vision import make_vision_encoder


class Cache(NamedTuple):
  """Decode cache for the whole decoder: one entry per *applied* layer (depth of them,
  even when blocks share weights: their activations differ), and the number of filled
  positions."""
  layers: tuple
  index: jax.Array  # int32 scalar


def make_dropout(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Dropout:
  # Only a model that uses dropout holds an RNG stream: a dropout-free model's state is
  # parameters only, which keeps checkpoints and sharding trees free of key arrays. The
  # train step reseeds the stream from (seed, step) with `nnx.reseed`, so it is never
  # checkpointed either.
  return nnx.Dropout(cfg.dropout, rngs=rngs if cfg.dropout > 0 else None)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, causal: bool = True, rngs: nnx.Rngs):
    kw = dict(eps=cfg.norm_eps, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.attn_norm = Norm(cfg.width, cfg.norm, **kw)
    self.attn = Attention(cfg, causal=causal, rngs=rngs)
    self.mlp_norm = Norm(cfg.width, cfg.norm, **kw)
    self.mlp = MLP(cfg.width, cfg.ffn_dim, cfg.mlp_activation, dtype=cfg.compute_dtype,
                   param_dtype=cfg.weight_dtype, out_init_scale=1.0 / (2 * cfg.depth), rngs=rngs)
    self.dropout = make_dropout(cfg, rngs)

  def __call__(self, x, *, positions=None, cache=None, cache_index=None, prefix_len=None):
    h, cache = self.attn(self.attn_norm(x), positions=positions, cache=cache,
                         cache_index=cache_index, prefix_len=prefix_len)
    x = x + self.dropout(h)
    x = x + self.dropout(self.mlp(self.mlp_norm(x)))
    return x, cache


def check_tokens(tokens, vocab_size: int, what: str = "tokens") -> None:
  """Host-side check (no-op under tracing): ids must be in [0, vocab_size).

  ``jnp.take`` silently clamps out-of-range ids, which would train on garbage.
  """
  if isinstance(tokens, jax.core.Tracer) or (
      isinstance(tokens, jax.Array) and not tokens.is_fully_addressable):
    return  # traced, or spread over several hosts: checked where the data is made
  arr = np.asarray(tokens)
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    raise ValueError(f"{what} contain ids outside [0, vocab_size={vocab_size}): "
                     f"min={arr.min()}, max={arr.max()}")


class GPT(nnx.Module):
  """Decoder-only transformer. ``prefix`` embeddings (e.g. image tokens) may precede text."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    self.embed = Embed(cfg.vocab_size, cfg.width, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.positions = (LearnedPositions(cfg.max_seq_len, cfg.width, dtype=dt, param_dtype=pdt,
                                       rngs=rngs) if cfg.position == "learned" else None)
    # Weight sharing (ALBERT): only `unique_layers` blocks exist; layer i applies block
    # i mod u, so the parameter count and the checkpoint really shrink.
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.unique_layers)])
    self.final_norm = Norm(cfg.width, cfg.norm, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
    self.head = (None if cfg.tie_embeddings else
                 Dense((cfg.width,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                       dtype=dt, param_dtype=pdt, rngs=rngs))
    self.dropout = make_dropout(cfg, rngs)

  # -- pieces -------------------------------------------------------------------------
  def layer(self, i: int) -> Block:
    return self.blocks[i % len(self.blocks)]

  def embed_inputs(self, tokens: jax.Array, prefix: Optional[jax.Array], offset) -> jax.Array:
    x = self.embed(tokens)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    if self.positions is not None:
      x = x + self.positions(offset + jnp.arange(x.shape[1]))
    return self.dropout(x)

  def logits(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    if self.head is None:
      return self.embed.attend(h)
    return self.head(h).astype(jnp.float32)

  def _stack(self, x, *, positions, caches=None, cache_index=None, prefix_len=None):
    cfg = self.config
    new_caches = []
    for i in range(cfg.depth):
      block = self.layer(i)
      cache = None if caches is None else caches[i]
      if cfg.remat and caches is None:
        # Rematerialise each block in the backward pass: activation memory O(1) in depth.
        x, cache = nnx.remat(lambda b, y: b(y, positions=positions, prefix_len=prefix_len))(block, x)
      else:
        x, cache = block(x, positions=positions, cache=cache, cache_index=cache_index,
                         prefix_len=prefix_len)
      new_caches.append(cache)
    return x, tuple(new_caches)

  # -- public -------------------------------------------------------------------------
  def __call__(self, tokens: jax.Array, *, prefix: Optional[jax.Array] = None,
               return_hidden: bool = False):
    """Full (training) forward. tokens (B, T) int -> logits (B, T, V) float32.

    ``prefix`` (B, P, D): embeddings placed before the text (image tokens); logits are
    returned for the text positions only. ``return_hidden`` also returns the final
    hidden states (B, T, D) (before the final norm), e.g. for distillation.
    """
    check_tokens(tokens, self.config.vocab_size)
    p = 0 if prefix is None else prefix.shape[1]
    x = self.embed_inputs(tokens, prefix, 0)
    prefix_len = p if (p and self.config.prefix_lm) else None
    h, _ = self._stack(x, positions=jnp.arange(x.shape[1]), prefix_len=prefix_len)
    h = h[:, p:]
    logits = self.logits(h)
    return (logits, h) if return_hidden else logits

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    cfg = self.config
    if cfg.position == "learned" and max_len > cfg.max_seq_len:
      raise ValueError(f"cache max_len={max_len} exceeds ModelConfig.max_seq_len="
                       f"{cfg.max_seq_len} (learned positions end there)")
    dtype = dtype or cfg.compute_dtype
    if cfg.attention == "softmax":
      layer = lambda: KVCache.zeros(batch_size, max_len, cfg.kv_heads, cfg.head_dim, dtype)
    else:
      layer = lambda: LinearState.zeros(batch_size, cfg.num_heads, cfg.head_dim)
    return Cache(tuple(layer() for _ in range(cfg.depth)), jnp.zeros((), jnp.int32))

  def decode(self, tokens: jax.Array, cache: Cache, *, prefix: Optional[jax.Array] = None):
    """Append ``tokens`` (and a ``prefix``, at prefill) to ``cache``.

    Returns (logits of the last position (B, V) float32, updated cache). Prefill and
    single-token steps are the same call.
    """
    check_tokens(tokens, self.config.vocab_size)
    p = 0 if prefix is None else prefix.shape[1]
    x = self.embed_inputs(tokens, prefix, cache.index)
    positions = cache.index + jnp.arange(x.shape[1])
    prefix_len = p if (p and self.config.prefix_lm) else None
    h, layers = self._stack(x, positions=positions, caches=cache.layers,
                            cache_index=cache.index, prefix_len=prefix_len)
    logits = self.logits(h[:, -1])
    return logits, Cache(layers, cache.index + x.shape[1])


class Projector(nnx.Module):
  """Vision width -> decoder width: Linear-GELU-Linear (as in LLaVA-1.5)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    hidden = cfg.projector_hidden or cfg.width
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.fc1 = Dense((cfg.vision.width,), (hidden,), ("vision_embed", "mlp"), **kw)
    self.fc2 = Dense((hidden,), (cfg.width,), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class VLM(nnx.Module):
  """Vision encoder -> projector -> image tokens prepended to text -> GPT decoder."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.vision is None:
      raise ValueError("ModelConfig.vision=None is invalid for VLM: set a VisionConfig "
                       "(kind 'cnn' or 'vit'), or use GPT for a text-only model")
    self.config = cfg
    self.vision = make_vision_encoder(cfg.vision, dtype=cfg.compute_dtype,
                                      param_dtype=cfg.weight_dtype, rngs=rngs)
    self.projector = Projector(cfg, rngs=rngs)
    self.decoder = GPT(cfg, rngs=rngs)

  def encode_image(self, image: jax.Array) -> jax.Array:
    """image (B, H, W, C) float in [0, 1] -> image tokens in decoder width (B, P, D)."""
    v = self.config.vision
    expected = (v.image_size, v.image_size, v.channels)
    if image.ndim != 4 or tuple(image.shape[1:]) != expected:
      raise ValueError(f"image shape {tuple(image.shape)} is invalid: expected (B, "
                       f"{v.image_size}, {v.image_size}, {v.channels}) from VisionConfig "
                       f"(image_size={v.image_size}, channels={v.channels})")
    return self.projector(self.vision(image))

  def __call__(self, tokens: jax.Array, image: Optional[jax.Array] = None, *,
               return_hidden: bool = False):
    prefix = None if image is None else self.encode_image(image)
    return self.decoder(tokens, prefix=prefix, return_hidden=return_hidden)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    return self.decoder.init_cache(batch_size, max_len, dtype)

  def decode(self, tokens: jax.Array, cache: Cache, *, image: Optional[jax.Array] = None):
    prefix = None if image is None else self.encode_image(image)
    return self.decoder.decode(tokens, cache, prefix=prefix)


def count_params(model_or_state) -> int:
  """Number of parameters (``nnx.Param`` leaves) of a model, a state or an abstract state."""
  state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
