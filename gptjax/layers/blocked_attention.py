"""Memory-efficient softmax attention: online softmax over key blocks (flash-style).

The einsum path holds (B, N, T, S) float32 logits; this one holds one (B, N, bq, bk) block
at a time, so forward and backward memory are linear in T. Masks are built per block from
the same description the einsum path uses (``position_mask``): causal with a query offset,
a bidirectional prefix, packed segments and padding. For causal masks the key blocks that
lie wholly in a query block's future are never visited (dynamic loop bounds), which halves
the work; a hand-written backward (``jax.custom_vjp``) makes that possible, since reverse
mode cannot differentiate a loop with traced bounds, and it stores only q, k, v, the output
and the per-row log-sum-exp (autodiff through a scan would keep every step's running
accumulator: O(T^2 / bk) memory).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Segment ids (optional, (B, S) int32) let one row hold several independent sequences
# (packing) and padding: id 0 is a shared prefix (image tokens) that every query of the row
# may see, ids >= 1 are separate text segments that see only themselves (and the prefix),
# and PAD_SEGMENT marks padding, which no query ever sees.
SHARED_SEGMENT = 0
PAD_SEGMENT = -1

_NEG = float(jnp.finfo(jnp.float32).min)
# Query and key block length; None picks it per call (``default_block``). Read at call
# time, so tests may pin it.
BLOCK_SIZE: Optional[int] = None
# The block's float32 logits, one (B, N, b, b) tile per loop step, should stay in cache.
# Measured on the 2-core EPYC (1 MiB L2 per core), causal fwd + bwd, best block of 64 / 128
# / 256: B 8 x 4 heads at T 256 -> 64 (13 ms; 128: 16 ms, 256: 36 ms); B 2 x 12 heads at
# T 1K -> 128 (225 ms; 64: 243, 256: 279); B 1 x 4 heads at T 4K -> 256 (476 ms; 128: 528).
# Those winners are exactly the largest tiles within 1.5 MiB.
TILE_BYTES = 3 << 19
BLOCK_CHOICES = (256, 128, 64)


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
  """(B, S, K, H) kv heads repeated to ``num_heads`` (for kernels without grouped heads)."""
  groups = num_heads // x.shape[-2]
  return x if groups == 1 else jnp.repeat(x, groups, axis=-2)


def position_mask(qpos: jax.Array, kpos: jax.Array, *, causal: bool, prefix_len,
                  q_segment_ids=None, kv_segment_ids=None) -> Optional[jax.Array]:
  """(B or 1, Tq, Tk) bool: the query at buffer position qpos[i] may see the key at kpos[j].

  The one mask definition both softmax paths use; None means everything is visible.
  """
  allowed = None
  if causal:
    allowed = kpos[None, :] <= qpos[:, None]
    if prefix_len is not None:
      allowed = allowed | (kpos[None, :] < prefix_len)
    allowed = allowed[None]
  if kv_segment_ids is not None:
    kseg = kv_segment_ids[:, None, :]
    seg_ok = kseg != PAD_SEGMENT
    if q_segment_ids is not None:
      seg_ok = seg_ok & ((kseg == q_segment_ids[:, :, None]) | (kseg == SHARED_SEGMENT))
    allowed = seg_ok if allowed is None else allowed & seg_ok
  return allowed


class _Static(NamedTuple):
  causal: bool
  bq: int
  bk: int
  s: int  # true key length (keys at positions >= s are block padding)
  nq: int
  nk: int


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_mask(st: _Static, i, j, off, prefix, qseg, kseg):
  """(B or 1, 1, 1, bq, bk) bool for query block i x key block j, or None."""
  qpos = i * st.bq + jnp.arange(st.bq) + off
  kpos = j * st.bk + jnp.arange(st.bk)
  qs = None if qseg is None else _slice(qseg, i * st.bq, st.bq, 1)
  ks = None if kseg is None else _slice(kseg, j * st.bk, st.bk, 1)
  mask = position_mask(qpos, kpos, causal=st.causal, prefix_len=prefix if st.causal else None,
                       q_segment_ids=qs, kv_segment_ids=ks)
  if st.s < st.nk * st.bk:
    valid = (kpos < st.s)[None, None]
    mask = valid if mask is None else mask & valid
  return None if mask is None else mask[:, None, None]


def _key_range(st: _Static, i, off, prefix):
  """Key blocks [0, hi) that query block i can see."""
  if not st.causal:
    return st.nk
  hi = jnp.clip(((i + 1) * st.bq - 1 + off) // st.bk + 1, 0, st.nk)
  return jnp.maximum(hi, jnp.minimum((prefix + st.bk - 1) // st.bk, st.nk))


def _query_start(st: _Static, j, off, prefix):
  """First query block that can see key block j (all later ones can too)."""
  if not st.causal:
    return 0
  lo = jnp.clip((j * st.bk - off) // st.bq, 0, st.nq)
  return jnp.where(j * st.bk < prefix, 0, lo)


def _logits(qi, kj):
  return jnp.einsum("bkgqh,bksh->bkgqs", qi, kj,
                    preferred_element_type=jnp.float32) * (qi.shape[-1] ** -0.5)


def _forward(st: _Static, q, k, v, off, prefix, qseg, kseg):
  """q (B, K, G, Tp, H), k/v (B, K, Sp, H) -> out like q, lse (B, K, G, Tp) float32."""

  def qblock(i):
    qi = _slice(q, i * st.bq, st.bq, 3)

    def body(j, carry):
      acc, m, l = carry
      kj, vj = _slice(k, j * st.bk, st.bk, 2), _slice(v, j * st.bk, st.bk, 2)
      sc = _logits(qi, kj)
      mask = _block_mask(st, i, j, off, prefix, qseg, kseg)
      if mask is not None:
        sc = jnp.where(mask, sc, _NEG)
      m_new = jnp.maximum(m, sc.max(-1))
      p = jnp.exp(sc - m_new[..., None])
      if mask is not None:
        # A row with nothing visible yet has m_new == _NEG and p == 1: zero it explicitly.
        p = jnp.where(mask, p, 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), vj,
                      preferred_element_type=jnp.float32)
      return acc * corr[..., None] + pv, m_new, l * corr + p.sum(-1)

    shape = qi.shape[:-1]
    init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(shape, _NEG, jnp.float32),
            jnp.zeros(shape, jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, _key_range(st, i, off, prefix), body, init)
    # Rows that see no key at all (padding queries) give zeros and +inf log-sum-exp, so the
    # backward's exp(s - lse) is 0 there: finite output, no gradient.
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(qblock, jnp.arange(st.nq))  # (nq, B, K, G, bq, ...)
  b, kh, g = q.shape[:3]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, st.nq * st.bq, -1)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, st.nq * st.bq)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, off, prefix, qseg, kseg):
  return _forward(st, q, k, v, off, prefix, qseg, kseg)[0]


def _flash_fwd(st, q, k, v, off, prefix, qseg, kseg):
  out, lse = _forward(st, q, k, v, off, prefix, qseg, kseg)
  return out, (q, k, v, off, prefix, qseg, kseg, out, lse)


def _flash_bwd(st, res, dout):
  q, k, v, off, prefix, qseg, kseg, out, lse = res
  do = dout.astype(jnp.float32)
  delta = (do * out.astype(jnp.float32)).sum(-1)  # rowsum(dO * O) = rowsum(P * dP)
  scale = q.shape[-1] ** -0.5
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))

  def kblock(dq, j):
    kj, vj = _slice(k32, j * st.bk, st.bk, 2), _slice(v32, j * st.bk, st.bk, 2)

    def body(i, carry):
      dq, dk, dv = carry
      qi, doi = _slice(q32, i * st.bq, st.bq, 3), _slice(do, i * st.bq, st.bq, 3)
      lsei, di = _slice(lse, i * st.bq, st.bq, 3), _slice(delta, i * st.bq, st.bq, 3)
      p = jnp.exp(_logits(qi, kj) - lsei[..., None])
      mask = _block_mask(st, i, j, off, prefix, qseg, kseg)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p, doi)
      ds = p * (jnp.einsum("bkgqh,bksh->bkgqs", doi, vj) - di[..., None]) * scale
      dqi = _slice(dq, i * st.bq, st.bq, 3) + jnp.einsum("bkgqs,bksh->bkgqh", ds, kj)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dqi, i * st.bq, 3)
      return dq, dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, qi), dv

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(_query_start(st, j, off, prefix), st.nq, body,
                                   (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(kblock, jnp.zeros(q.shape, jnp.float32), jnp.arange(st.nk))
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  # Offsets, prefix and segment ids are integers: no cotangent.
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_block(batch: int, heads: int) -> int:
  """The largest of ``BLOCK_CHOICES`` whose (batch, heads, b, b) float32 tile fits in
  ``TILE_BYTES`` (the smallest choice when none does)."""
  for b in BLOCK_CHOICES:
    if batch * heads * b * b * 4 <= TILE_BYTES:
      return b
  return BLOCK_CHOICES[-1]


def softmax_blocked(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    prefix_len=None, q_offset=0, q_segment_ids: Optional[jax.Array] = None,
                    kv_segment_ids: Optional[jax.Array] = None,
                    block_q: Optional[int] = None, block_k: Optional[int] = None) -> jax.Array:
  """Same contract as ``softmax_attention`` (q (B, T, N, H), k/v (B, S, K, H), GQA).

  Blocks need not divide T or S (the tails are padded and masked). Differs from the einsum
  path only on rows that see no key at all: zeros here, the mean of v there.
  ``block_q`` / ``block_k`` default to ``BLOCK_SIZE`` or, when that is None,
  ``default_block``.
  """
  default = BLOCK_SIZE or default_block(q.shape[0], q.shape[2])
  block_q = default if block_q is None else block_q
  block_k = default if block_k is None else block_k
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"block_q={block_q}, block_k={block_k} must be positive")
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  nq, nk = -(-t // bq), -(-s // bk)
  st = _Static(bool(causal), bq, bk, s, nq, nk)
  pad_t, pad_s = nq * bq - t, nk * bk - s
  qh = jnp.pad(q.reshape(b, t, kh, n // kh, h), ((0, 0), (0, pad_t), (0, 0), (0, 0), (0, 0)))
  qh = qh.transpose(0, 2, 3, 1, 4)  # (B, K, G, Tp, H): one contiguous block per head group
  kv = [jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v)]
  qseg = None if q_segment_ids is None else jnp.pad(
      q_segment_ids.astype(jnp.int32), ((0, 0), (0, pad_t)), constant_values=PAD_SEGMENT)
  kseg = None if kv_segment_ids is None else jnp.pad(
      kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad_s)), constant_values=PAD_SEGMENT)
  off = jnp.asarray(q_offset, jnp.int32)
  prefix = jnp.asarray(0 if prefix_len is None else prefix_len, jnp.int32)
  out = _flash(st, qh, kv[0], kv[1], off, prefix, qseg, kseg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, nq * bq, n, h)[:, :t]
