"""The fused GPU / TPU attention paths with gptjax's masks (prefix-LM image tokens, packed
segments, padding), checked on CPU against the einsum path (the reference: the same mask
definition applied to explicit logits): the cuDNN call's arguments through
``jax.nn.dot_product_attention(implementation='xla')``, splash attention through Pallas'
interpreter. The GPU and TPU kernels themselves need their hardware."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.layers import attention as A
from gptjax.layers import fused_attention as F
from gptjax.layers.blocked_attention import PAD_SEGMENT, SHARED_SEGMENT, position_mask

B, N, K, H = 2, 4, 2, 16  # grouped-query: 2 query heads per kv head


def _qkv(t, seed=0):
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, t, N, H)).astype(np.float32)
  k, v = (r.normal(size=(B, t, K, H)).astype(np.float32) for _ in range(2))
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _reference(q, k, v, **masks):
  """Explicit logits over repeated kv heads, the mask from ``position_mask`` (the one mask
  definition every path shares), a float32 softmax."""
  t, s = q.shape[1], k.shape[1]
  mask = position_mask(jnp.arange(t), jnp.arange(s), **masks)
  k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  logits = jnp.where(mask[:, None], logits, -1e30)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def _packed_segments(t, prefix=0):
  """Row 0: two packed text segments then right padding; row 1: one segment, left padded.
  The image prefix (if any) is the shared segment."""
  text = t - prefix
  rows = np.full((B, t), PAD_SEGMENT, np.int32)
  rows[:, :prefix] = SHARED_SEGMENT
  a = text // 3
  rows[0, prefix:prefix + a] = 1
  rows[0, prefix + a:prefix + 2 * a] = 2
  rows[1, prefix + a:] = 1
  return jnp.asarray(rows)


def _loss_and_grads(fn, q, k, v, real):
  """Mean over the real (non-padding) queries' outputs, and its gradients."""
  def loss(q, k, v):
    y = fn(q, k, v)
    w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(jnp.where(real[:, :, None, None], y * w, 0.0))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


CASES = {  # name -> (T, prefix_len, segments?)
    "causal": (32, None, False),
    "prefix_lm": (32, 8, False),
    "packed_padded_text": (32, None, True),
    "packed_vlm": (32, 8, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_arguments_compute_the_einsum_attention(case):
  t, prefix, segmented = CASES[case]
  q, k, v = _qkv(t)
  seg = _packed_segments(t, prefix or 0) if segmented else None
  masks = dict(causal=True, prefix_len=prefix, q_segment_ids=seg, kv_segment_ids=seg)
  real = jnp.ones((B, t), bool) if seg is None else seg != PAD_SEGMENT
  ref = _loss_and_grads(lambda *a: _reference(*a, **masks), q, k, v, real)
  got = _loss_and_grads(lambda *a: F.cudnn_attention(*a, implementation="xla", **masks),
                        q, k, v, real)
  _assert_close(ref, got, 2e-5)


@pytest.mark.parametrize("case", ["causal", "prefix_lm", "packed_padded_text"])
def test_splash_interpreted_matches_the_einsum_attention(case):
  # Forward and the kernel's own backward (its dq / dkv kernels), interpreted on CPU.
  t, prefix, segmented = CASES[case]
  t, prefix = 2 * 128, prefix and 160  # splash blocks are 128 keys: two, the prefix past one
  q, k, v = _qkv(t, seed=1)
  seg = _packed_segments(t) if segmented else None
  masks = dict(causal=True, prefix_len=prefix, q_segment_ids=seg, kv_segment_ids=seg)
  real = jnp.ones((B, t), bool) if seg is None else seg != PAD_SEGMENT
  ref = _loss_and_grads(lambda *a: _reference(*a, **masks), q, k, v, real)
  got = _loss_and_grads(
      lambda *a: F.splash_attention(*a, interpret=True, **masks), q, k, v, real)
  _assert_close(ref, got, 1e-4)


def test_routing_by_backend_and_mask():
  q = jnp.zeros((1, 512, N, H), jnp.bfloat16)
  pick = lambda backend, **ok: A.choose_implementation("auto", q, q, backend=backend, **ok)  # noqa: E731
  both = dict(cudnn_ok=True, splash_ok=True)
  assert pick("gpu", **both) == "cudnn"  # any mask: cuDNN takes it as a boolean mask
  assert pick("tpu", **both) == "pallas"
  assert pick("tpu", cudnn_ok=True, splash_ok=False) == "blocked"  # T*S > the einsum's size
  assert pick("gpu", cudnn_ok=False, splash_ok=False) == "blocked"
  f32 = q.astype(jnp.float32)
  assert A.choose_implementation("auto", f32, f32, backend="gpu", **both) == "blocked"
  # Splash takes packed text and unpacked image prefixes, not packed rows sharing a prefix.
  ok = lambda **kw: F.splash_supports(t=256, s=256, **kw)  # noqa: E731
  assert ok(prefix_len=None, q_segments=True, kv_segments=True)
  assert ok(prefix_len=8, q_segments=False, kv_segments=False)
  assert not ok(prefix_len=8, q_segments=True, kv_segments=True)
  assert not ok(prefix_len=None, q_segments=False, kv_segments=True)
  assert not F.splash_supports(prefix_len=None, q_segments=False, kv_segments=False, t=200,
                               s=200)
  with pytest.raises(ValueError, match="splash attention cannot take this mask.*'blocked'"):
    seg = _packed_segments(256, 8)
    F.splash_attention(*_qkv(256), causal=True, prefix_len=8, q_segment_ids=seg,
                       kv_segment_ids=seg, interpret=True)
