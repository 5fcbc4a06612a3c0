"""The accelerators' fused softmax-attention kernels, fed gptjax's masks.

* **GPU: cuDNN** flash attention, ``jax.nn.dot_product_attention(implementation='cudnn')``.
  A plain causal / full batch passes ``is_causal`` only; any other mask (the prefix-LM image
  tokens, packed segments, padding) goes in as the boolean ``mask`` argument (B, 1, T, S),
  which cuDNN applies inside the fused kernel: one byte per query-key pair and row is
  materialised, not the float32 logits of every head.
* **TPU: Pallas splash attention** (``jax.experimental.pallas.ops.tpu.splash_attention``):
  the causal / prefix-LM pattern is its static block-sparse mask (fully masked blocks are
  skipped), packing and padding are its segment ids. Splash's segments are equality
  classes, so a packed row whose segments all see one shared image prefix has no splash
  form; ``splash_supports`` says so and those batches take the blocked path.

Both compute the same function as ``position_mask`` + softmax (the einsum path), tested
against it on CPU: the cuDNN call's arguments through ``implementation='xla'`` (the same
function, XLA's kernel), splash through Pallas' interpreter (``interpret=True``).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.layers.blocked_attention import PAD_SEGMENT, position_mask, repeat_kv


def cudnn_attention(q, k, v, *, causal: bool, prefix_len: Optional[int] = None,
                    q_segment_ids=None, kv_segment_ids=None, implementation: str = "cudnn"):
  """q (B, T, N, H), k / v (B, S, K, H) -> (B, T, N, H) through
  ``jax.nn.dot_product_attention``. ``implementation='xla'`` runs the same call with XLA's
  kernel (how CPU tests check the mask)."""
  if prefix_len is None and kv_segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation=implementation)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  qpos, kpos = jnp.arange(t), jnp.arange(s)
  mask = position_mask(qpos, kpos, causal=causal, prefix_len=prefix_len,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  if q_segment_ids is not None:
    # A padding query sees nothing; let it see its own slot, so no row of the fused
    # softmax is empty (its output is never used: padding is out of the loss).
    pad_q = (q_segment_ids == PAD_SEGMENT)[:, :, None]
    mask = mask | (pad_q & (kpos[None, None, :] == qpos[None, :, None]))
  mask = jnp.broadcast_to(mask[:, None], (b, 1, t, s))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def splash_supports(*, prefix_len: Optional[int], q_segments: bool, kv_segments: bool, t: int,
                    s: int, block: int = 128) -> bool:
  """Whether splash computes this mask exactly: self-attention in whole blocks, segment ids
  for both queries and keys or for neither, and not both an image prefix and segments
  (packed rows sharing one prefix; see the module doc)."""
  # (the kernel's key blocks are whole multiples of the TPU's 128 lanes)
  return (t == s and t % block == 0 and q_segments == kv_segments
          and not (prefix_len and kv_segments))


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, s: int, n: int, causal: bool, prefix_len: Optional[int],
                   block: int, interpret: bool):
  # Imported lazily: the Pallas TPU ops are only needed (and only compile) on TPU.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = position_mask(jnp.arange(t), jnp.arange(s), causal=causal, prefix_len=prefix_len)
  mask = np.ones((t, s), bool) if mask is None else np.asarray(mask[0])
  bq = bk = block
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                        block_kv_dq=bk)
  multi = sm.MultiHeadMask([sm.NumpyMask(mask) for _ in range(n)])
  return sk.make_splash_mha(multi, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash_attention(q, k, v, *, causal: bool, prefix_len: Optional[int] = None,
                     q_segment_ids=None, kv_segment_ids=None, block: int = 128,
                     interpret: bool = False):
  """q (B, T, N, H), k / v (B, T, K, H) -> (B, T, N, H) with the splash kernel, one
  example at a time (``vmap``); grouped kv heads are repeated to N. Raises ValueError
  where ``splash_supports`` is False."""
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
      SegmentIds)
  _, t, n, h = q.shape
  s = k.shape[1]
  has_segments = kv_segment_ids is not None
  if not splash_supports(prefix_len=prefix_len, q_segments=q_segment_ids is not None,
                         kv_segments=has_segments, t=t, s=s, block=block):
    raise ValueError(f"splash attention cannot take this mask (T={t}, S={s}, block {block}, "
                     f"prefix_len={prefix_len}, query segments {q_segment_ids is not None}, "
                     f"key segments {has_segments}); use 'blocked'")
  kernel = _splash_kernel(t, s, n, causal, prefix_len or None, block, interpret)
  k, v = repeat_kv(k, n), repeat_kv(v, n)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (B, N, T, H) per kernel call
  # The kernel does not scale the logits: scale the queries (what the einsum path computes).
  qs = heads_first(q * jnp.asarray(h ** -0.5, q.dtype))
  if not has_segments:
    out = jax.vmap(kernel)(qs, heads_first(k), heads_first(v))
  else:
    # Padding keys are never seen by a real query (its id differs); a padding query sees
    # the padding keys up to its own slot (never an empty row; its output is unused). The
    # shared id only marks an image prefix, excluded above, so for real queries equality
    # is exactly position_mask's rule.
    def one(q1, k1, v1, q_seg, kv_seg):
      return kernel(q1, k1, v1, segment_ids=SegmentIds(q_seg, kv_seg))

    out = jax.vmap(one)(qs, heads_first(k), heads_first(v),
                         q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
  return heads_first(out)
