"""The blocked (flash-style) softmax kernel against the einsum path (itself checked against
NumPy loops in test_attention.py): outputs and gradients, every mask, memory growth, model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptjax
from gptjax.init import compiled_init
from gptjax.layers import attention as A
from gptjax.layers import blocked_attention as BA

B, T, N, H = 2, 37, 4, 8  # T: not a multiple of the 8 / 16 blocks used below
ATOL = 1e-5


def _qkv(seed, t=T, s=None, kv_heads=N):
  r = np.random.default_rng(seed)
  s = t if s is None else s
  return (jnp.asarray(r.standard_normal((B, t, N, H)), jnp.float32),
          jnp.asarray(r.standard_normal((B, s, kv_heads, H)), jnp.float32),
          jnp.asarray(r.standard_normal((B, s, kv_heads, H)), jnp.float32))


def _segments(t=T):
  # Row 0: a shared prefix (0), two packed documents, trailing padding. Row 1: left padding
  # (rows that see nothing when there is no prefix), one document.
  seg = np.ones((B, t), np.int32)
  seg[0, :5], seg[0, 20:31], seg[0, 31:] = A.SHARED_SEGMENT, 2, A.PAD_SEGMENT
  seg[1, :4] = A.PAD_SEGMENT
  return jnp.asarray(seg)


def _loss_and_grads(impl, kw, weights, row_weight, block=(8, 16)):
  def attend(q, k, v, off):
    if impl == "blocked":
      return BA.softmax_blocked(q, k, v, q_offset=off, block_q=block[0], block_k=block[1],
                                **kw)
    return A.softmax_attention(q, k, v, q_offset=off, implementation="xla", **kw)

  def loss(q, k, v, off):
    out = attend(q, k, v, off)
    # Rows that see no key differ by design (zeros vs the einsum's mean of v): weight 0.
    return (out * weights * row_weight).sum(), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


CASES = {
    "causal-gqa": dict(causal=True, kv_heads=2),
    "bidirectional": dict(causal=False),
    "prefix-over-block-edge": dict(causal=True, prefix_len=17),
    # prefix 5 covers row 0's shared segment; row 1's left padding still sees nothing.
    "segments-prefix-gqa": dict(causal=True, prefix_len=5, segments=True, kv_heads=1),
}


@pytest.mark.parametrize("name", CASES)
def test_blocked_matches_einsum_forward_and_grads(name):
  kw = dict(CASES[name])
  q, k, v = _qkv(hash(name) % 1000, kv_heads=kw.pop("kv_heads", N))
  row = jnp.ones((B, T, 1, 1))
  if kw.pop("segments", False):
    seg = _segments()
    kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    mask = np.asarray(A._mask(T, T, causal=kw["causal"], q_offset=0,
                              prefix_len=kw.get("prefix_len"), q_segment_ids=seg,
                              kv_segment_ids=seg))
    row = jnp.asarray(mask.any(-1), jnp.float32)[:, :, None, None]
    assert 0 < float(row.sum()) < B * T  # the test does have rows that see nothing
  w = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, N, H)), jnp.float32)
  (l_ref, o_ref), g_ref = _loss_and_grads("xla", kw, w, row)(q, k, v, 0)
  (l_blk, o_blk), g_blk = _loss_and_grads("blocked", kw, w, row)(q, k, v, 0)
  assert np.isfinite(np.asarray(o_blk)).all()
  # Rows that see nothing (left padding without a shared prefix) are zeros.
  np.testing.assert_array_equal(np.asarray(o_blk)[np.asarray(row[..., 0, 0]) == 0], 0.0)
  np.testing.assert_allclose(np.asarray(o_blk * row), np.asarray(o_ref * row), atol=ATOL)
  np.testing.assert_allclose(float(l_blk), float(l_ref), rtol=1e-5, atol=1e-4)
  for gb, gr, what in zip(g_blk, g_ref, "qkv"):
    assert np.isfinite(np.asarray(gb)).all(), what
    np.testing.assert_allclose(np.asarray(gb), np.asarray(gr), atol=ATOL, err_msg=what)


@pytest.mark.parametrize("t,offset", [(5, 11), (1, 30)])
def test_blocked_with_cache_offset(t, offset):
  # Prefill / decode against a fixed-size cache: queries at buffer positions offset..,
  # a traced offset, padding slots beyond the filled part and before it (left padding).
  s = 40
  q, k, v = _qkv(3, t=t, s=s, kv_heads=2)
  kseg = np.full((B, s), A.PAD_SEGMENT, np.int32)
  kseg[:, :offset + t] = 1
  kseg[1, :3] = A.PAD_SEGMENT
  kseg = jnp.asarray(kseg)
  qseg = jnp.ones((B, t), jnp.int32)
  kw = dict(causal=True, q_segment_ids=qseg, kv_segment_ids=kseg)
  w = jnp.asarray(np.random.default_rng(4).standard_normal((B, t, N, H)), jnp.float32)
  row = jnp.ones((B, t, 1, 1))
  (_, o_ref), g_ref = _loss_and_grads("xla", kw, w, row)(q, k, v, jnp.int32(offset))
  (_, o_blk), g_blk = _loss_and_grads("blocked", kw, w, row)(q, k, v, jnp.int32(offset))
  np.testing.assert_allclose(np.asarray(o_blk), np.asarray(o_ref), atol=ATOL)
  for gb, gr in zip(g_blk, g_ref):
    np.testing.assert_allclose(np.asarray(gb), np.asarray(gr), atol=ATOL)


def _temp_bytes(impl, t):
  x = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
  f = jax.jit(jax.grad(lambda q, k, v: A.softmax_attention(q, k, v, causal=True,
                                                           implementation=impl).sum(),
                       argnums=(0, 1, 2)))
  return f.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_grows_linearly():
  # Forward + backward temp memory from 1K to 4K tokens: the einsum holds (T, T) logits
  # (x16), the blocked kernel O(T) state (x4, plus per-block constants). Compiled, not run.
  blk = _temp_bytes("blocked", 4096) / _temp_bytes("blocked", 1024)
  ein = _temp_bytes("xla", 4096) / _temp_bytes("xla", 1024)
  assert blk < 6, blk
  assert ein > 12, ein


def test_auto_picks_blocked_above_threshold_and_rejects_unknown():
  small = jnp.zeros((1, 64, 4, 8))
  big = jnp.zeros((1, 1024, 4, 8))
  ok = dict(cudnn_ok=True, splash_ok=True)
  if jax.default_backend() == "cpu":
    assert A.choose_implementation("auto", small, small, **ok) == "xla"
    assert A.choose_implementation("auto", big, big, **ok) == "blocked"
  assert A.choose_implementation("auto", big, big, cudnn_ok=False, splash_ok=False) == "blocked"
  assert A.choose_implementation("blocked", small, small, **ok) == "blocked"
  with pytest.raises(ValueError, match="implementation='flash'.*'blocked'"):
    A.softmax_attention(small, small, small, implementation="flash")
  assert gptjax.preset("tiny", attention_impl="blocked").attention_impl == "blocked"
  with pytest.raises(ValueError, match="attention_impl.*'blocked'"):
    gptjax.preset("tiny", attention_impl="flash")


@pytest.fixture(scope="module")
def tiny_models():
  """The same weights with attention_impl 'xla' and 'blocked' (8-token blocks)."""
  cfg = gptjax.preset("tiny", position="rope", depth=1)
  ref = compiled_init(lambda: gptjax.GPT(cfg, rngs=nnx.Rngs(0)))
  # Built abstractly and given ref's weights: one initialisation, not two.
  blk = nnx.eval_shape(lambda: gptjax.GPT(dataclasses.replace(cfg, attention_impl="blocked"),
                                          rngs=nnx.Rngs(0)))
  nnx.update(blk, nnx.state(ref))
  return ref, blk


_forward = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))
_prefill = nnx.jit(lambda m, x, cache: m.decode(x, cache)[0])


def test_model_forward_blocked_equals_einsum(tiny_models, monkeypatch):
  monkeypatch.setattr(BA, "BLOCK_SIZE", 8)  # several blocks in a 30-token row
  ref, blk = tiny_models
  t = 30
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, ref.config.vocab_size, (B, t)),
                       jnp.int32)
  seg = np.ones((B, t), np.int32)
  seg[0, 12:] = 2  # two packed documents
  seg[1, 25:] = A.PAD_SEGMENT
  seg = jnp.asarray(seg)
  a, b = (np.asarray(_forward(m, tokens, seg)) for m in (ref, blk))
  np.testing.assert_allclose(b[0], a[0], atol=1e-4)
  np.testing.assert_allclose(b[1, :25], a[1, :25], atol=1e-4)
  assert not np.allclose(a[0, 12:], np.asarray(_forward(ref, tokens, jnp.ones_like(seg)))[0, 12:],
                         atol=1e-3)  # the segments did matter
  # Cached prefill: 30 queries against a 48-slot cache whose tail is padding.
  a, b = (np.asarray(_prefill(m, tokens, m.init_cache(B, 48))) for m in (ref, blk))
  np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.parametrize("batch,heads,want", [(8, 4, 64), (2, 12, 128), (1, 4, 256),
                                              (64, 16, 64)])
def test_default_block_is_the_largest_tile_in_budget(batch, heads, want):
  tile = lambda b: batch * heads * b * b * 4  # one float32 (B, N, b, b) logits tile
  assert BA.default_block(batch, heads) == want
  assert want == BA.BLOCK_CHOICES[-1] or tile(want) <= BA.TILE_BYTES
  assert want == BA.BLOCK_CHOICES[0] or tile(2 * want) > BA.TILE_BYTES


def test_softmax_blocked_takes_default_block_when_unpinned(monkeypatch):
  # softmax_blocked asks default_block when no block is given or pinned; a block that does
  # not divide T still matches the einsum path.
  monkeypatch.setattr(BA, "BLOCK_SIZE", None)
  q, k, v = _qkv(9, t=70)
  seen = []
  monkeypatch.setattr(BA, "default_block", lambda b, n: seen.append((b, n)) or 32)
  out = BA.softmax_blocked(q, k, v, causal=True)
  assert seen == [(B, N)]
  ref = A.softmax_attention(q, k, v, causal=True, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)
