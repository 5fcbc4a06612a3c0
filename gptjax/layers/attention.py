"""Every attention kind behind one call: softmax (causal / prefix-LM / bidirectional, GQA)
and causal linear attention (Katharopoulos et al. 2020), plus their decode-time caches.

Arrays are shaped (B, T, N, H) for queries and (B, S, K, H) for keys/values (N query heads,
K kv heads, N % K == 0). The public functions work on plain arrays; ``Attention`` is the
NNX module a transformer block uses.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.layers.blocked_attention import (  # noqa: F401  (segment ids re-exported)
    PAD_SEGMENT, SHARED_SEGMENT, position_mask, repeat_kv, softmax_blocked)
from gptjax.layers.embed import apply_rope
from gptjax.layers.fused_attention import cudnn_attention, splash_attention, splash_supports
from gptjax.layers.linear import Dense

LINEAR_EPS = 1e-6  # in the linear-attention normaliser: phi(q).z is > 0 but can underflow

# Segment ids (SHARED_SEGMENT, PAD_SEGMENT, packing and padding): see blocked_attention.


# ----------------------------------------------------------------------------------------
# Caches
class KVCache(NamedTuple):
  """Softmax attention cache for one layer: keys/values for ``max_len`` positions.

  Kept as K (B*K, S, H) and V (B*K, H, S), batch and kv heads merged into one leading
  axis (row b * K + kv_head; batch the major part, so a batch-sharded cache stays one
  contiguous block per device), not in the projections' (B, S, K, H); a decode step's two
  dots batch over that axis (``softmax_over_cache``). Why: inside the decode
  ``while_loop`` XLA:CPU copied every layer's whole cache on every step (1) wherever the
  cache's layout differed from the dots' (a ``copy(transpose)`` in the loop body), and
  (2) wherever the cache had a unit dimension (batch 1): it fused the cache update once for
  the loop's output and once more, with the unit dim bitcast away, for the dot, and copied
  the cache for each (4 copies per cache per step, K (B, K, S, H) or (K, B, S, H) alike).
  With no unit dim and the dots' own layout the loop body has no copy at batch 1 or 8:
  GPT-2-small, cache 256, batch 1: kernel time per decoded token 33.4 -> 25.6 ms (profiled;
  96 cache copies, 8 ms, gone), generate's decode step 29.0 -> 26.3 ms (2-core Xeon).
  """
  k: jax.Array  # (B*K, S_max, H)
  v: jax.Array  # (B*K, H, S_max)

  @classmethod
  def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
    return cls(jnp.zeros((batch * kv_heads, max_len, head_dim), dtype),
               jnp.zeros((batch * kv_heads, head_dim, max_len), dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  def update(self, k: jax.Array, v: jax.Array, index) -> "KVCache":
    """Writes new keys / values (B, T, K, H) at slots ``index`` .. ``index + T - 1``."""
    b, t, kh, h = k.shape
    k = jnp.transpose(k, (0, 2, 1, 3)).reshape(b * kh, t, h).astype(self.k.dtype)
    v = jnp.transpose(v, (0, 2, 3, 1)).reshape(b * kh, h, t).astype(self.v.dtype)
    return KVCache(jax.lax.dynamic_update_slice_in_dim(self.k, k, index, axis=1),
                   jax.lax.dynamic_update_slice_in_dim(self.v, v, index, axis=2))

  def standard(self, kv_heads: int) -> tuple[jax.Array, jax.Array]:
    """Keys and values as (B, S_max, K, H), the layout ``softmax_attention`` takes."""
    x, s, h = self.k.shape
    k = self.k.reshape(x // kv_heads, kv_heads, s, h).transpose(0, 2, 1, 3)
    v = self.v.reshape(x // kv_heads, kv_heads, h, s).transpose(0, 3, 1, 2)
    return k, v


def softmax_over_cache(q: jax.Array, cache: KVCache, mask: jax.Array) -> jax.Array:
  """The einsum path against a ``KVCache`` (its slots beyond the current one masked):
  q (B, T, N, H), ``mask`` (B or 1, T, S_max) -> (B, T, N, H). The two dots batch over the
  cache's merged (batch, kv head) axis, the g query heads of a kv head and their T
  positions one row axis, so neither the cache nor a view of it is rearranged."""
  b, t, n, h = q.shape
  x, s, _ = cache.k.shape
  kh, g = x // b, n // (x // b)
  qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(x, g * t, h)
  logits = jnp.einsum("xqh,xsh->xqs", qg, cache.k.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (h**-0.5)
  m = jnp.broadcast_to(mask[:, None, None], (b, kh, g, t, s)).reshape(x, g * t, s)
  probs = jax.nn.softmax(jnp.where(m, logits, jnp.finfo(jnp.float32).min), axis=-1)
  out = jnp.einsum("xqs,xhs->xqh", probs.astype(q.dtype), cache.v.astype(q.dtype))
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class LinearState(NamedTuple):
  """Linear attention's O(1) decode state for one layer, kept in float32.

  ``s`` = sum_t phi(k_t) v_t^T (B, N, H, H); ``z`` = sum_t phi(k_t) (B, N, H).
  """
  s: jax.Array
  z: jax.Array

  @classmethod
  def zeros(cls, batch: int, num_heads: int, head_dim: int, value_dim: Optional[int] = None
            ) -> "LinearState":
    value_dim = value_dim or head_dim
    return cls(jnp.zeros((batch, num_heads, head_dim, value_dim), jnp.float32),
               jnp.zeros((batch, num_heads, head_dim), jnp.float32))


# ----------------------------------------------------------------------------------------
# Softmax attention
def _mask(t: int, s: int, *, causal: bool, q_offset, prefix_len, q_segment_ids=None,
          kv_segment_ids=None) -> Optional[jax.Array]:
  """(B or 1, T, S) bool: query i (at buffer position q_offset + i) may see key j."""
  return position_mask(jnp.arange(t) + q_offset, jnp.arange(s), causal=causal,
                       prefix_len=prefix_len, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids)


def _softmax_xla(q, k, v, mask):
  """The einsum path: q (B, T, N, H), k / v (B, S, K, H).

  Both matmuls are plain batched matmuls over (batch, kv head): the g query heads of a kv
  head and their T positions are one (g*T) row axis (GQA without repeating k / v). Why:
  written as one 5-D einsum over (b, t, k, g, h), XLA:CPU's backward of the two dots cost
  3.5x as much (fwd + bwd at B 8, T 256, 4 x 32 heads: 30.6 vs 8.9 ms; PyTorch's SDPA
  6.7 ms), which made a whole train step of the mini shape 1.6x PyTorch's.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
  logits = jnp.einsum("bkqh,bksh->bkqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  if mask is not None:
    # finfo.min rather than -inf: a fully masked row (never produced here, but cheap
    # insurance) gives a uniform distribution instead of NaN.
    s = logits.shape[-1]
    logits = jnp.where(mask[:, None, None], logits.reshape(b, kh, g, t, s),
                       jnp.finfo(jnp.float32).min).reshape(b, kh, g * t, s)
  probs = jax.nn.softmax(logits, axis=-1)  # float32 whatever the activation dtype
  out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v)
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "pallas")
# 'auto' uses the blocked (flash-style) kernel once the einsum's T*S logits pass this many
# per head. Measured on the 2-core CPU (causal, float32, forward + backward, the blocked
# kernel at its default block): at B 8, 4 x 32 heads, T 128 they tie (4.8 / 4.6 ms), at
# T 256 blocked is 2.2x faster (32 / 14.8 ms; PyTorch's SDPA 10.9); at B 1, 4 x 64 heads
# 1.3x at T 512, 2.4x at 1K, 2.6x at 2K, 3.2x at 4K.
BLOCKED_MIN_LOGITS = 128 * 128


def choose_implementation(requested: str, q: jax.Array, k: jax.Array, *, cudnn_ok: bool,
                          splash_ok: bool, backend: Optional[str] = None) -> str:
  """Pick the softmax backend. ``cudnn_ok`` / ``splash_ok``: the fused GPU / TPU kernel can
  take this call's mask (see ``gptjax.layers.fused_attention``); ``backend`` defaults to
  JAX's.

  Measured on a 2-core CPU (jax 0.10, T=512 and 2048): the einsum path beats
  jax.nn.dot_product_attention(implementation=None) by 1.4-1.7x; the blocked kernel beats
  both above ``BLOCKED_MIN_LOGITS``. cuDNN flash attention needs half precision; splash
  wants 128-aligned lengths; everything else (other backends and dtypes, masks a kernel
  cannot take) goes to einsum or blocked by size.
  """
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={requested!r}: allowed values are "
                     f"{', '.join(map(repr, IMPLEMENTATIONS))}")
  if requested != "auto":
    return requested
  backend = backend or jax.default_backend()
  if cudnn_ok and backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if splash_ok and backend == "tpu" and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0:
    return "pallas"
  return "blocked" if q.shape[1] * k.shape[1] > BLOCKED_MIN_LOGITS else "xla"


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                      prefix_len: Optional[int] = None, q_offset=0,
                      q_segment_ids: Optional[jax.Array] = None,
                      kv_segment_ids: Optional[jax.Array] = None,
                      implementation: str = "auto") -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  Args:
    q: (B, T, N, H); k, v: (B, S, K, H), N % K == 0 (grouped-query attention).
    causal: query i sees keys j <= i + q_offset. False: every key is visible.
    prefix_len: prefix-LM; keys j < prefix_len are visible to every query (image tokens).
    q_offset: position of the first query (decoding against a cache); may be traced.
    q_segment_ids, kv_segment_ids: (B, T) / (B, S) segment ids (see PAD_SEGMENT above);
      kv alone masks padding keys.
    implementation: one of ``IMPLEMENTATIONS``; 'blocked' never holds (T, S) logits;
      'cudnn' (GPU) and 'pallas' (TPU splash) are the fused kernels, with masks.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
  t, s = q.shape[1], k.shape[1]
  # The fused kernels take no query offset (decoding against a cache).
  no_offset = isinstance(q_offset, int) and q_offset == 0 and (not causal or t == s)
  splash_ok = no_offset and splash_supports(
      prefix_len=prefix_len, q_segments=q_segment_ids is not None,
      kv_segments=kv_segment_ids is not None, t=t, s=s)
  impl = choose_implementation(implementation, q, k, cudnn_ok=no_offset, splash_ok=splash_ok)
  masks = dict(causal=causal, prefix_len=prefix_len, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids)
  if impl == "cudnn":
    if not no_offset:
      raise ValueError("attention_impl='cudnn' takes no query offset (decoding against a "
                       "cache); use 'auto'")
    return cudnn_attention(q, k, v, **masks)
  if impl == "pallas":
    return splash_attention(q, k, v, **masks)
  if impl == "blocked":
    return softmax_blocked(q, k, v, q_offset=q_offset, **masks)
  mask = _mask(t, s, q_offset=q_offset, **masks)
  return _softmax_xla(q, k, v, mask)


# ----------------------------------------------------------------------------------------
# Causal linear attention
def feature_map(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1 > 0, computed in float32."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int = 64,
                     state: Optional[LinearState] = None, return_state: bool = False,
                     prefix_len: Optional[int] = None, kv_valid: Optional[jax.Array] = None):
  """Causal linear attention, chunked parallel form.

  out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), S_t = sum_{s<=t} phi(k_s) v_s^T,
  z_t = sum_{s<=t} phi(k_s). Inside a chunk of C tokens the quadratic (masked) form is used;
  across chunks a float32 running state (S, z) is carried by ``lax.scan``, so memory is
  O(T*C + H^2) rather than O(T^2) and the state matches the recurrent form exactly.

  Args:
    q: (B, T, N, H); k, v: (B, T, K, H) (kv heads repeated for GQA).
    chunk_size: C; need not divide T (the tail is zero-padded; padded keys are masked out
      of the state because phi(0) = 1, not 0).
    state: incoming ``LinearState`` (tokens already consumed), default zeros.
    return_state: also return the state after the last token.
    prefix_len: prefix-LM; queries at positions < prefix_len see the whole prefix.
    kv_valid: optional (B, T) bool; False keys/values (padding) are left out of the state.
      (Linear attention has one running state per row, so it cannot isolate several packed
      segments; padding is all it supports.)
  """
  b, t, n, h = q.shape
  k, v = repeat_kv(k, n), repeat_kv(v, n)
  e = v.shape[-1]
  if chunk_size <= 0:
    raise ValueError(f"chunk_size={chunk_size} must be positive")
  c = min(chunk_size, t)
  pad = (-t) % c
  fq, fk, v32 = feature_map(q), feature_map(k), v.astype(jnp.float32)
  if kv_valid is not None:
    fk = jnp.where(kv_valid[:, :, None, None], fk, 0.0)
  if pad:
    fq, fk, v32 = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (fq, fk, v32))
    valid = (jnp.arange(t + pad) < t)[None, :, None, None]
    fk = jnp.where(valid, fk, 0.0)
  nc = (t + pad) // c
  chunks = lambda x: jnp.moveaxis(x.reshape(b, nc, c, n, x.shape[-1]), 1, 0)
  tril = jnp.tril(jnp.ones((c, c), jnp.float32))
  if state is None:
    state = LinearState.zeros(b, n, h, e)

  def step(carry: LinearState, xs):
    qc, kc, vc = xs  # (B, C, N, H)
    a = jnp.einsum("bcnh,bdnh->bncd", qc, kc) * tril
    num = jnp.einsum("bncd,bdne->bcne", a, vc) + jnp.einsum("bcnh,bnhe->bcne", qc, carry.s)
    den = jnp.einsum("bncd->bcn", a) + jnp.einsum("bcnh,bnh->bcn", qc, carry.z)
    out = num / (den[..., None] + LINEAR_EPS)
    new = LinearState(carry.s + jnp.einsum("bdnh,bdne->bnhe", kc, vc), carry.z + kc.sum(1))
    return new, out

  final, out = jax.lax.scan(step, state, (chunks(fq), chunks(fk), chunks(v32)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, t + pad, n, e)[:, :t]
  if prefix_len:
    # Bidirectional prefix: every prefix query sees the state after the whole prefix.
    p = prefix_len
    s_p = state.s + jnp.einsum("bpnh,bpne->bnhe", fk[:, :p], v32[:, :p])
    z_p = state.z + fk[:, :p].sum(1)
    num = jnp.einsum("bpnh,bnhe->bpne", fq[:, :p], s_p)
    den = jnp.einsum("bpnh,bnh->bpn", fq[:, :p], z_p)
    out = out.at[:, :p].set(num / (den[..., None] + LINEAR_EPS))
  out = out.astype(q.dtype)
  return (out, final) if return_state else out


def linear_attention_step(q: jax.Array, k: jax.Array, v: jax.Array, state: LinearState,
                          kv_valid: Optional[jax.Array] = None):
  """Recurrent form: one token (q (B, N, H), k/v (B, K, H)) from the O(1) state."""
  n = q.shape[1]
  k, v = repeat_kv(k, n), repeat_kv(v, n)
  fq, fk = feature_map(q), feature_map(k)
  if kv_valid is not None:
    fk = jnp.where(kv_valid[:, None, None], fk, 0.0)
  s = state.s + jnp.einsum("bnh,bne->bnhe", fk, v.astype(jnp.float32))
  z = state.z + fk
  out = jnp.einsum("bnh,bnhe->bne", fq, s) / (jnp.einsum("bnh,bnh->bn", fq, z)[..., None]
                                               + LINEAR_EPS)
  return out.astype(q.dtype), LinearState(s, z)


# ----------------------------------------------------------------------------------------
# The module
class Attention(nnx.Module):
  """Multi-head attention of kind ``cfg.attention`` with GQA and optional RoPE.

  ``__call__(x, positions, cache=None, cache_index=None, prefix_len=None)`` returns
  ``(y, new_cache)``; without a cache it is the training / full forward path.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    """``cfg``: a ``gptjax.layers.block.BlockConfig`` (sizes, kind, dtypes, causality)."""
    d, n, kh, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), **kw)
    self.k = Dense((d,), (kh, h), ("embed", "kv_heads", "head_dim"), **kw)
    self.v = Dense((d,), (kh, h), ("embed", "kv_heads", "head_dim"), **kw)
    # GPT-2's residual-projection scaling keeps the residual stream's variance depth-independent.
    self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"),
                   init_scale=1.0 / (2 * cfg.depth), **kw)
    self.kind = cfg.attention
    self.impl = cfg.attention_impl
    self.chunk_size = cfg.linear_chunk_size
    self.rope_theta = cfg.rope_theta
    self.causal = cfg.causal

  def __call__(self, x: jax.Array, *, positions: Optional[jax.Array] = None, cache=None,
               cache_index=None, prefix_len: Optional[int] = None,
               segment_ids: Optional[jax.Array] = None,
               kv_segment_ids: Optional[jax.Array] = None):
    """``segment_ids`` (B, T): the tokens' own segments; with a cache, ``kv_segment_ids``
    (B, S_max) are the segments of every cache slot (after this call's update)."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    if self.kind == "softmax":
      y, cache = self._softmax(q, k, v, cache, cache_index, prefix_len, segment_ids,
                               kv_segment_ids)
    else:
      valid = None if segment_ids is None else segment_ids != PAD_SEGMENT
      y, cache = self._linear(q, k, v, cache, prefix_len, valid)
    return self.o(y), cache

  def _softmax(self, q, k, v, cache: Optional[KVCache], cache_index, prefix_len, segment_ids,
               kv_segment_ids):
    if cache is None:
      return softmax_attention(q, k, v, causal=self.causal, prefix_len=prefix_len,
                               q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                               implementation=self.impl), None
    # Attend over the whole fixed-size cache: positions beyond the current one are masked
    # by causality, so the shapes stay static for jit. The fused kernels take no offset, so
    # only einsum / blocked apply ('auto' picks by size: a long prefill goes blocked, over
    # the cache turned back into the standard layout, once per prompt).
    impl = self.impl if self.impl in ("xla", "blocked") else "auto"
    t, s = q.shape[1], cache.max_len
    if impl == "xla" or (impl == "auto" and t * s <= BLOCKED_MIN_LOGITS):
      mask = _mask(t, s, causal=True, q_offset=cache_index, prefix_len=prefix_len,
                   q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
      cache = cache.update(k, v, cache_index)
      return softmax_over_cache(q, cache, mask), cache
    cache = cache.update(k, v, cache_index)
    ks, vs = cache.standard(k.shape[2])
    y = softmax_attention(q, ks.astype(q.dtype), vs.astype(q.dtype), causal=True,
                          prefix_len=prefix_len, q_offset=cache_index,
                          q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                          implementation="blocked")
    return y, cache

  def _linear(self, q, k, v, cache: Optional[LinearState], prefix_len, kv_valid):
    if not self.causal:
      raise ValueError("linear attention is causal only; use softmax for bidirectional encoders")
    if cache is None:
      return linear_attention(q, k, v, chunk_size=self.chunk_size, prefix_len=prefix_len,
                              kv_valid=kv_valid), None
    if q.shape[1] == 1 and not prefix_len:
      y, cache = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], cache,
                                       None if kv_valid is None else kv_valid[:, 0])
      return y[:, None], cache
    return linear_attention(q, k, v, chunk_size=self.chunk_size, state=cache,
                            return_state=True, prefix_len=prefix_len, kv_valid=kv_valid)
