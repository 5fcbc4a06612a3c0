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
from gptjax.init import compiled_init
from gptjax.layers.attention import PAD_SEGMENT, SHARED_SEGMENT, KVCache, LinearState
from gptjax.layers.block import Block, BlockConfig, make_dropout
from gptjax.layers.contrastive import ContrastiveHead
from gptjax.layers.embed import Embed, LearnedPositions
from gptjax.layers.linear import Dense
from gptjax.layers.norm import Norm
from gptjax.layers.stacked import module_slice, stack_modules
from gptjax.vision import make_vision_encoder


class Cache(NamedTuple):
  """Decode cache for the whole decoder: one entry per *applied* layer (depth of them,
  even when blocks share weights: their activations differ), the number of filled slots,
  each slot's segment id (PAD_SEGMENT for left padding of ragged prompts, never attended)
  and each row's count of padding slots (a token's position = its slot - pad)."""
  layers: tuple
  index: jax.Array  # int32 scalar
  segments: jax.Array  # (B, S_max) int32
  pad: jax.Array  # (B,) int32


def block_config(cfg: ModelConfig) -> BlockConfig:
  """The decoder's blocks: causal, the model's sizes, kind and dtypes."""
  return BlockConfig(
      width=cfg.width, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim, mlp_activation=cfg.mlp_activation,
      norm=cfg.norm, norm_eps=cfg.norm_eps, attention=cfg.attention,
      attention_impl=cfg.attention_impl, linear_chunk_size=cfg.linear_chunk_size,
      rope_theta=cfg.rope_theta if cfg.position == "rope" else None, dropout=cfg.dropout,
      depth=cfg.depth, causal=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def remat_policy(name: str):
  """``jax.checkpoint`` policy of ``ModelConfig.remat``: None saves nothing ('full', and
  unused for 'none'); 'dots' saves the outputs of matmuls without batch dimensions (the
  projections and MLP, the expensive part) and recomputes norms, activations, softmax."""
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if name == "dots" else None


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
    dt, pdt = cfg.dtype, cfg.param_dtype
    self.embed = Embed(cfg.vocab_size, cfg.width, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.positions = (LearnedPositions(cfg.max_total_len, cfg.width, dtype=dt, param_dtype=pdt,
                                       rngs=rngs) if cfg.position == "learned" else None)
    # Weight sharing (ALBERT): only `num_unique_layers` blocks exist; layer i applies block
    # i mod u, so the parameter count and the checkpoint really shrink.
    # scan_layers: the u blocks are stored as one stacked block (leading `layers` axis),
    # drawn from the same random stream, so a seed gives the same weights in either layout.
    bcfg = block_config(cfg)
    blocks = [Block(bcfg, rngs=rngs) for _ in range(cfg.num_unique_layers)]
    self.blocks = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = Norm(cfg.width, cfg.norm, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
    self.head = (None if cfg.tie_embeddings else
                 Dense((cfg.width,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                       dtype=dt, param_dtype=pdt, rngs=rngs))
    self.dropout = make_dropout(cfg.dropout, rngs)

  # -- pieces -------------------------------------------------------------------------
  def layer(self, i: int) -> Block:
    """The block layer i applies (block i mod u); in the scan layout, a module over slices
    of the stacked arrays."""
    u = self.config.num_unique_layers
    if self.config.scan_layers:
      return module_slice(self.blocks, i % u)
    return self.blocks[i % u]

  def embed_inputs(self, tokens: jax.Array, prefix: Optional[jax.Array],
                   positions: jax.Array) -> jax.Array:
    """[prefix | token embeddings] + positional embeddings at ``positions`` (B, S)."""
    x = self.embed(tokens)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    if self.positions is not None:
      x = x + self.positions(positions)
    return self.dropout(x)

  def logits(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    if self.head is None:
      return self.embed.attend(h)
    return self.head(h).astype(jnp.float32)

  def _stack(self, x, *, positions, caches=None, cache_index=None, prefix_len=None,
             segment_ids=None, kv_segment_ids=None):
    cfg = self.config
    kw = dict(positions=positions, prefix_len=prefix_len, segment_ids=segment_ids)
    if cfg.scan_layers and caches is None:
      return self._scan_stack(x, kw)
    policy = remat_policy(cfg.remat)
    new_caches = []
    for i in range(cfg.depth):
      block = self.layer(i)
      if cfg.remat != "none" and caches is None:
        # Rematerialise each block in the backward pass: activation memory O(1) in depth.
        x, cache = nnx.remat(lambda b, y: b(y, **kw), policy=policy)(block, x)
      else:
        x, cache = block(x, cache=None if caches is None else caches[i],
                         cache_index=cache_index, kv_segment_ids=kv_segment_ids, **kw)
      new_caches.append(cache)
    return x, tuple(new_caches)

  def _scan_stack(self, x, kw):
    """The training / eval forward as ONE ``jax.lax.scan`` over the ``depth`` layers.

    Why: the Python loop hands XLA ``depth`` copies of the block, so compile time grows
    with depth; a scan body is compiled once, and the stored stack (``self.blocks``, one
    array per parameter kind with a leading axis of u) is what it consumes.

    Weight sharing (u < depth): layer i's parameters (block i mod u) are gathered into a
    depth-long stack and scanned over as ``xs`` rather than picked inside the body with a
    dynamic index: the gradient of a dynamic index is a (u, ...) buffer added into the
    carried gradient at every step, O(depth * u) work, while ``xs`` hands each layer's
    gradient out as a scan output and the gather's transpose sums the shared ones once.
    """
    cfg = self.config
    graphdef, state = nnx.split(self.blocks)
    if cfg.num_unique_layers != cfg.depth:
      layer_block = np.arange(cfg.depth) % cfg.num_unique_layers  # static
      state = jax.tree.map(lambda s: jnp.take(s, layer_block, axis=0), state)

    def body(h, state):
      h, _ = nnx.merge(graphdef, state)(h, **kw)
      return h, None

    if cfg.remat != "none":
      # prevent_cse=False: a scan already keeps XLA from merging the recomputation with the
      # forward (jax.checkpoint's documented advice for scan bodies).
      body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(cfg.remat))
    x, _ = jax.lax.scan(body, x, state)
    return x, (None,) * cfg.depth

  # -- public -------------------------------------------------------------------------
  def __call__(self, tokens: jax.Array, *, prefix: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
               return_hidden: bool = False, cache: Optional[Cache] = None,
               token_mask: Optional[jax.Array] = None):
    """Full (training) forward. tokens (B, T) int -> logits (B, T, V) float32.

    With ``cache`` this is ``decode`` instead (returns (last logits, cache)). Decoding goes
    through ``__call__`` on purpose: wrappers that intercept a model's ``__call__`` (qwix
    quantization) then also cover cached decoding.

    ``prefix`` (B, P, D): embeddings placed before the text (image tokens, positions
    0..P-1); logits are returned for the text positions only.
    ``segment_ids`` (B, T): text segments for packing several sequences into one row
    (ids >= 1, each sees only itself and the prefix) and padding (PAD_SEGMENT = -1, never
    seen); ``positions`` (B, T): text positions, e.g. restarting at 0 in every segment
    (default 0..T-1). ``return_hidden`` also returns the final hidden states (B, T, D)
    (before the final norm), e.g. for distillation.
    """
    if cache is not None:
      return self._decode(tokens, cache, prefix=prefix, token_mask=token_mask)
    check_tokens(tokens, self.config.vocab_size)
    b, t = tokens.shape
    p = 0 if prefix is None else prefix.shape[1]
    text_pos = jnp.broadcast_to(jnp.arange(t) if positions is None else positions, (b, t))
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), p + text_pos], axis=1)
    seg = None
    if segment_ids is not None:
      seg = jnp.concatenate([jnp.full((b, p), SHARED_SEGMENT, jnp.int32),
                             segment_ids.astype(jnp.int32)], axis=1)
    x = self.embed_inputs(tokens, prefix, pos)
    prefix_len = p if (p and self.config.prefix_lm) else None
    h, _ = self._stack(x, positions=pos, prefix_len=prefix_len, segment_ids=seg)
    h = h[:, p:]
    logits = self.logits(h)
    return (logits, h) if return_hidden else logits

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    cfg = self.config
    if cfg.position == "learned" and max_len > cfg.max_total_len:
      raise ValueError(f"cache max_len={max_len} exceeds the {cfg.max_total_len} positions of "
                       f"the learned table (image tokens {cfg.num_image_tokens} + "
                       f"ModelConfig.max_seq_len={cfg.max_seq_len})")
    dtype = dtype or cfg.dtype
    if cfg.attention == "softmax":
      layer = lambda: KVCache.zeros(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
    else:
      layer = lambda: LinearState.zeros(batch_size, cfg.num_heads, cfg.head_dim)
    return Cache(tuple(layer() for _ in range(cfg.depth)), jnp.zeros((), jnp.int32),
                 jnp.full((batch_size, max_len), PAD_SEGMENT, jnp.int32),
                 jnp.zeros((batch_size,), jnp.int32))

  def decode(self, tokens: jax.Array, cache: Cache, *, prefix: Optional[jax.Array] = None,
             token_mask: Optional[jax.Array] = None):
    """Append ``tokens`` (and a ``prefix``, at prefill) to ``cache``; see ``_decode``."""
    return self(tokens, prefix=prefix, cache=cache, token_mask=token_mask)

  def _decode(self, tokens: jax.Array, cache: Cache, *, prefix: Optional[jax.Array] = None,
              token_mask: Optional[jax.Array] = None):
    """Append ``tokens`` (and a ``prefix``, at prefill) to ``cache``.

    ``token_mask`` (B, T) bool marks real tokens; False entries must be *left* padding of
    a ragged prompt batch (they are never attended and do not advance positions).
    Returns (logits of the last position (B, V) float32, updated cache). Prefill and
    single-token steps are the same call.
    """
    check_tokens(tokens, self.config.vocab_size)
    b, t = tokens.shape
    p = 0 if prefix is None else prefix.shape[1]
    if token_mask is None:
      token_mask = jnp.ones((b, t), bool)
    text_seg = jnp.where(token_mask, 1, PAD_SEGMENT).astype(jnp.int32)
    seg = jnp.concatenate([jnp.full((b, p), SHARED_SEGMENT, jnp.int32), text_seg], axis=1)
    pad = cache.pad + jnp.sum(~token_mask, axis=1).astype(jnp.int32)
    slots = cache.index + jnp.arange(p + t)
    # Position of a slot: its index minus the row's padding before it (prefix: no padding).
    pad_before = jnp.concatenate([jnp.broadcast_to(cache.pad[:, None], (b, p)),
                                  cache.pad[:, None] + jnp.cumsum(~token_mask, axis=1)], axis=1)
    pos = jnp.maximum(slots[None, :] - pad_before, 0)
    segments = jax.lax.dynamic_update_slice_in_dim(cache.segments, seg, cache.index, axis=1)
    x = self.embed_inputs(tokens, prefix, pos)
    prefix_len = p if (p and self.config.prefix_lm) else None
    h, layers = self._stack(x, positions=pos, caches=cache.layers, cache_index=cache.index,
                            prefix_len=prefix_len, segment_ids=seg, kv_segment_ids=segments)
    logits = self.logits(h[:, -1])
    return logits, Cache(layers, cache.index + p + t, segments, pad)


class Projector(nnx.Module):
  """Vision width -> decoder width: Linear-GELU-Linear (as in LLaVA-1.5)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    hidden = cfg.projector_hidden or cfg.width
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
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
    self.vision = make_vision_encoder(cfg.vision, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, rngs=rngs)
    self.projector = Projector(cfg, rngs=rngs)
    self.decoder = GPT(cfg, rngs=rngs)
    self.contrastive = (ContrastiveHead(cfg.width, cfg.contrastive_dim, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, rngs=rngs)
                        if cfg.contrastive_dim else None)

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
               segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
               return_hidden: bool = False, cache: Optional[Cache] = None,
               token_mask: Optional[jax.Array] = None,
               image_tokens: Optional[jax.Array] = None):
    """Text logits (B, T, V); see ``GPT.__call__`` for packing / padding arguments and for
    ``cache`` (decoding). ``image_tokens`` (``encode_image``'s output) instead of ``image``
    reuses an encoding (the joint LM + contrastive loss encodes each image once)."""
    if image is not None and image_tokens is not None:
      raise ValueError("pass image or image_tokens, not both")
    prefix = image_tokens if image is None else self.encode_image(image)
    if cache is not None:
      return self.decoder(tokens, prefix=prefix, cache=cache, token_mask=token_mask)
    return self.decoder(tokens, prefix=prefix, segment_ids=segment_ids, positions=positions,
                        return_hidden=return_hidden)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    return self.decoder.init_cache(batch_size, max_len, dtype)

  # -- contrastive head (ModelConfig.contrastive_dim > 0) -----------------------------
  def _head(self) -> ContrastiveHead:
    if self.contrastive is None:
      raise ValueError("this VLM has no contrastive head (ModelConfig.contrastive_dim=0): "
                       "train one with model.contrastive_dim > 0 and "
                       "train.contrastive_weight > 0")
    return self.contrastive

  def image_embedding(self, image: Optional[jax.Array] = None, *,
                      image_tokens: Optional[jax.Array] = None) -> jax.Array:
    """(B, C) unit vectors: the mean of the projected image tokens (B, P, D) (including
    the global token when the vision config has one), through the head's image map.
    Pass ``image_tokens`` (``encode_image``'s output) to reuse an encoding."""
    tokens = self.encode_image(image) if image_tokens is None else image_tokens
    return self._head().image(jnp.mean(tokens.astype(jnp.float32), axis=1))

  def text_embedding(self, ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """(B, C) unit vectors of right-padded text ``ids`` (B, L) with ``lengths`` (B,) real
    tokens: the decoder on the text alone (no image prefix), its final-normed hidden state
    at the last real token, through the head's text map.

    Why the last token: the decoder is causal, so only the last position has read the
    whole text; a mean would weight the first words (seen by every later state) most.
    Right padding comes after every real token, so causal attention never sees it.
    """
    head = self._head()
    _, h = self.decoder(ids, return_hidden=True)
    last = jnp.clip(lengths.astype(jnp.int32) - 1, 0, ids.shape[1] - 1)
    pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return head.text(self.decoder.final_norm(pooled))

  def decode(self, tokens: jax.Array, cache: Cache, *, image: Optional[jax.Array] = None,
             token_mask: Optional[jax.Array] = None):
    """Append tokens (and the image, at prefill) to ``cache`` -> (last logits, cache)."""
    return self(tokens, image, cache=cache, token_mask=token_mask)


def from_config(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
  """A randomly initialised model of ``cfg``: a ``VLM`` when ``cfg.vision`` is set, else a
  ``GPT``. ``seed`` seeds the parameters (and ``seed + 1`` the dropout stream)."""
  cls = VLM if cfg.vision is not None else GPT
  # nnx.Rngs(params=seed) is nnx.Rngs(params=jax.random.key(seed)); the seed is traced, so
  # every seed shares one compiled init program.
  make = lambda s: cls(cfg, rngs=nnx.Rngs(params=jax.random.key(s),  # noqa: E731
                                          dropout=jax.random.key(s + 1)))
  return compiled_init(make, seed, key=(cls, cfg))


def count_params(model_or_state) -> int:
  """Number of parameters (``nnx.Param`` leaves) of a model, a state or an abstract state."""
  state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
