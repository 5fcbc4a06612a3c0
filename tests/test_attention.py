"""Functional attention kernels against float64 NumPy transcriptions of their formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.layers import attention as A

B, T, N, H = 2, 7, 4, 8
RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------- references
def ref_softmax_attention(q, k, v, *, causal=True, prefix_len=None):
  """Explicit loops over batch, head and query: out[b,i,n] = sum_j p[j] v[b,j,n//g]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, n_, h_ = q.shape
  s_, k_ = k.shape[1], k.shape[2]
  g = n_ // k_
  out = np.zeros((b_, t_, n_, h_))
  for b in range(b_):
    for n in range(n_):
      kn, vn = k[b, :, n // g], v[b, :, n // g]
      for i in range(t_):
        scores = kn @ q[b, i, n] / np.sqrt(h_)
        visible = np.ones(s_, bool)
        if causal:
          visible = np.arange(s_) <= i
          if prefix_len is not None:
            visible |= np.arange(s_) < prefix_len
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        out[b, i, n] = p @ vn
  return out


def _phi(x):
  return np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1.0  # elu(x) + 1


def ref_linear_attention(q, k, v, s0=None, z0=None):
  """Token-by-token recurrence; returns out, S_T (B,N,H,H) [key dim, value dim], z_T (B,N,H)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, n_, h_ = q.shape
  g = n_ // k.shape[2]
  S = np.zeros((b_, n_, h_, h_)) if s0 is None else np.array(s0, np.float64)
  z = np.zeros((b_, n_, h_)) if z0 is None else np.array(z0, np.float64)
  out = np.zeros((b_, t_, n_, h_))
  for t in range(t_):
    for b in range(b_):
      for n in range(n_):
        pk, vv, pq = _phi(k[b, t, n // g]), v[b, t, n // g], _phi(q[b, t, n])
        S[b, n] += np.outer(pk, vv)
        z[b, n] += pk
        out[b, t, n] = (pq @ S[b, n]) / (pq @ z[b, n] + 1e-6)
  return out, S, z


def _qkv(seed, t=T, kv_heads=N, h=H):
  r = np.random.default_rng(seed)
  q = r.standard_normal((B, t, N, h)).astype(np.float32)
  k = r.standard_normal((B, t, kv_heads, h)).astype(np.float32)
  v = r.standard_normal((B, t, kv_heads, h)).astype(np.float32)
  return q, k, v


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- softmax
def test_reference_sanity():
  # The reference itself: the first query sees only key 0, so out[:, 0] == v[:, 0].
  q, k, v = _qkv(0)
  ref = ref_softmax_attention(q, k, v, causal=True)
  _close(ref[:, 0], v[:, 0].astype(np.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_matches_reference(causal):
  q, k, v = _qkv(1)
  out = A.softmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal)
  assert out.shape == (B, T, N, H)
  assert out.dtype == jnp.float32
  _close(out, ref_softmax_attention(q, k, v, causal=causal))


def test_softmax_causal_differs_from_bidirectional():
  q, k, v = _qkv(2)
  a = np.asarray(A.softmax_attention(q, k, v, causal=True))
  b = np.asarray(A.softmax_attention(q, k, v, causal=False))
  assert not np.allclose(a[:, :-1], b[:, :-1], atol=1e-3)
  _close(a[:, -1], b[:, -1].astype(np.float64))  # the last query sees everything either way


def test_softmax_explicit_xla_impl():
  q, k, v = _qkv(3)
  out = A.softmax_attention(q, k, v, causal=True, implementation="xla")
  _close(out, ref_softmax_attention(q, k, v, causal=True))


@pytest.mark.parametrize("prefix_len", [0, 1, 3, 5])
def test_softmax_prefix_lm(prefix_len):
  q, k, v = _qkv(4)
  out = A.softmax_attention(q, k, v, causal=True, prefix_len=prefix_len)
  _close(out, ref_softmax_attention(q, k, v, causal=True, prefix_len=prefix_len))


def test_softmax_prefix_edge_cases():
  q, k, v = _qkv(5)
  # prefix_len=0 adds nothing; prefix_len=T makes everything visible.
  causal = np.asarray(A.softmax_attention(q, k, v, causal=True))
  _close(A.softmax_attention(q, k, v, causal=True, prefix_len=0), causal.astype(np.float64))
  full = np.asarray(A.softmax_attention(q, k, v, causal=False))
  _close(A.softmax_attention(q, k, v, causal=True, prefix_len=T), full.astype(np.float64))
  # With prefix 3, query 0 sees keys 0..2 and differs from plain causal.
  pre = np.asarray(A.softmax_attention(q, k, v, causal=True, prefix_len=3))
  assert not np.allclose(pre[:, 0], causal[:, 0], atol=1e-3)
  _close(pre[:, 3:], ref_softmax_attention(q, k, v, causal=True, prefix_len=3)[:, 3:])


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_gqa_equals_repeated_mha(causal):
  q, k, v = _qkv(6, kv_heads=2)
  gqa = A.softmax_attention(q, k, v, causal=causal)
  g = N // 2
  mha = A.softmax_attention(q, np.repeat(k, g, axis=2), np.repeat(v, g, axis=2), causal=causal)
  _close(gqa, np.asarray(mha, np.float64))
  _close(gqa, ref_softmax_attention(q, k, v, causal=causal))


def test_softmax_gqa_group_mapping():
  # Head n must use kv head n // (N/K), not n % K: make the kv heads very different.
  q, k, v = _qkv(7, kv_heads=2)
  v[:, :, 1] += 100.0
  out = np.asarray(A.softmax_attention(q, k, v, causal=True))
  assert (out[:, :, :2] < 50).all() and (out[:, :, 2:] > 50).all()


@pytest.mark.parametrize("batch,kv_heads", [(1, N), (3, 2), (2, 1)])
def test_kv_cache_round_trip_and_softmax_over_cache(batch, kv_heads):
  """Keys / values written into the merged (B*K) cache come back per batch row and head
  (``standard``), and attention over the cache (two prompt chunks, then one decode query
  at each later slot, empty slots masked) matches the loop reference on the filled
  prefix: at batch 1 (the unit dim the layout exists for), with GQA, and with one kv head."""
  r = np.random.default_rng(batch * 10 + kv_heads)
  s_max, t = 12, 9
  q = r.standard_normal((batch, t, N, H)).astype(np.float32)
  k = r.standard_normal((batch, t, kv_heads, H)).astype(np.float32)
  v = r.standard_normal((batch, t, kv_heads, H)).astype(np.float32)
  cache = A.KVCache.zeros(batch, s_max, kv_heads, H, jnp.float32)
  cache = cache.update(jnp.asarray(k[:, :5]), jnp.asarray(v[:, :5]), 0)
  cache = cache.update(jnp.asarray(k[:, 5:]), jnp.asarray(v[:, 5:]), 5)
  ks, vs = cache.standard(kv_heads)
  assert ks.shape == vs.shape == (batch, s_max, kv_heads, H)
  np.testing.assert_array_equal(np.asarray(ks[:, :t]), k)
  np.testing.assert_array_equal(np.asarray(vs[:, :t]), v)
  assert not np.asarray(ks[:, t:]).any() and not np.asarray(vs[:, t:]).any()
  want = ref_softmax_attention(q, k, v, causal=True)
  for i in (0, 4, t - 1):  # query at slot i sees slots 0..i only
    mask = A._mask(1, s_max, causal=True, q_offset=i, prefix_len=None)
    got = A.softmax_over_cache(jnp.asarray(q[:, i:i + 1]), cache, mask)
    _close(got[:, 0], want[:, i])


def test_softmax_bfloat16_keeps_dtype():
  q, k, v = _qkv(8)
  qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  out = A.softmax_attention(qb, kb, vb, causal=True)
  assert out.dtype == jnp.bfloat16
  ref = ref_softmax_attention(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), causal=True)
  _close(out, ref, rtol=5e-2, atol=5e-2)


def test_softmax_jits():
  q, k, v = _qkv(9)
  f = jax.jit(lambda q, k, v: A.softmax_attention(q, k, v, causal=True, prefix_len=2))
  _close(f(q, k, v), ref_softmax_attention(q, k, v, causal=True, prefix_len=2))


# ----------------------------------------------------------------------------- linear
LT = 10


def test_linear_reference_sanity():
  # With one token, out_0 = phi(q).(phi(k) v^T) / (phi(q).phi(k) + eps) ~= v_0.
  q, k, v = _qkv(10, t=1)
  out, _, _ = ref_linear_attention(q, k, v)
  _close(out, v.astype(np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_linear_chunked_matches_reference(chunk):
  q, k, v = _qkv(11, t=LT)
  out = A.linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=chunk)
  assert out.shape == (B, LT, N, H)
  assert out.dtype == jnp.float32
  _close(out, ref_linear_attention(q, k, v)[0])


def test_linear_default_chunk():
  q, k, v = _qkv(12, t=LT)
  _close(A.linear_attention(q, k, v), ref_linear_attention(q, k, v)[0])


@pytest.mark.parametrize("chunk", [3, 16])
def test_linear_gqa(chunk):
  q, k, v = _qkv(13, t=LT, kv_heads=2)
  out = A.linear_attention(q, k, v, chunk_size=chunk)
  _close(out, ref_linear_attention(q, k, v)[0])
  rep = A.linear_attention(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), chunk_size=chunk)
  _close(out, np.asarray(rep, np.float64))


@pytest.mark.parametrize("chunk", [3, 4])
def test_linear_final_state(chunk):
  q, k, v = _qkv(14, t=LT)
  out, state = A.linear_attention(q, k, v, chunk_size=chunk, return_state=True)
  ref_out, S, z = ref_linear_attention(q, k, v)
  assert isinstance(state, A.LinearState)
  assert state.s.shape == (B, N, H, H) and state.z.shape == (B, N, H)
  assert state.s.dtype == jnp.float32 and state.z.dtype == jnp.float32
  _close(out, ref_out)
  _close(state.s, S)
  _close(state.z, z)


def test_linear_state_zeros():
  st = A.LinearState.zeros(B, N, H)
  assert st.s.shape == (B, N, H, H) and st.z.shape == (B, N, H)
  assert st.s.dtype == jnp.float32 and st.z.dtype == jnp.float32
  assert not np.asarray(st.s).any() and not np.asarray(st.z).any()


@pytest.mark.parametrize("kv_heads", [N, 2])
def test_linear_step_matches_reference(kv_heads):
  q, k, v = _qkv(15, t=LT, kv_heads=kv_heads)
  ref_out, S, z = ref_linear_attention(q, k, v)
  state = A.LinearState.zeros(B, N, H)
  step = jax.jit(A.linear_attention_step)
  outs = []
  for t in range(LT):
    o, state = step(q[:, t], k[:, t], v[:, t], state)
    assert o.shape == (B, N, H)
    outs.append(np.asarray(o))
  _close(np.stack(outs, 1), ref_out)
  _close(state.s, S)
  _close(state.z, z)


@pytest.mark.parametrize("split,chunk", [(5, 4), (3, 16), (6, 3)])
def test_linear_state_carry(split, chunk):
  q, k, v = _qkv(16, t=LT)
  whole, st_whole = A.linear_attention(q, k, v, chunk_size=chunk, return_state=True)
  a, st = A.linear_attention(q[:, :split], k[:, :split], v[:, :split], chunk_size=chunk,
                             return_state=True)
  b, st2 = A.linear_attention(q[:, split:], k[:, split:], v[:, split:], chunk_size=chunk,
                              state=st, return_state=True)
  _close(np.concatenate([np.asarray(a), np.asarray(b)], 1), np.asarray(whole, np.float64))
  _close(st2.s, np.asarray(st_whole.s, np.float64))
  _close(st2.z, np.asarray(st_whole.z, np.float64))
  # and against the reference started from the NumPy state after the prefix
  _, S, z = ref_linear_attention(q[:, :split], k[:, :split], v[:, :split])
  ref_b, _, _ = ref_linear_attention(q[:, split:], k[:, split:], v[:, split:], S, z)
  _close(b, ref_b)


def test_linear_state_then_step():
  # Prefill with the chunked kernel, continue token by token: the decode path.
  q, k, v = _qkv(17, t=LT, kv_heads=2)
  ref_out = ref_linear_attention(q, k, v)[0]
  _, st = A.linear_attention(q[:, :7], k[:, :7], v[:, :7], chunk_size=4, return_state=True)
  for t in range(7, LT):
    o, st = A.linear_attention_step(q[:, t], k[:, t], v[:, t], st)
    _close(o, ref_out[:, t])


def test_linear_is_causal():
  q, k, v = _qkv(18, t=LT)
  a = np.asarray(A.linear_attention(q, k, v, chunk_size=4))
  k2, v2 = k.copy(), v.copy()
  k2[:, 6:] += 3.0
  v2[:, 6:] -= 2.0
  b = np.asarray(A.linear_attention(q, k2, v2, chunk_size=4))
  np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_linear_gradients_finite():
  q, k, v = (jnp.asarray(x) for x in _qkv(19, t=LT, kv_heads=2))

  def loss(q, k, v):
    return A.linear_attention(q, k, v, chunk_size=4).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)).sum() > 0


def test_linear_gradient_matches_finite_difference():
  q, k, v = _qkv(20, t=6)
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  w = jnp.asarray(np.random.default_rng(1).standard_normal((B, 6, N, H)), jnp.float32)

  @jax.jit
  def loss(k):
    return (A.linear_attention(q, k, v, chunk_size=4) * w).sum()

  g = np.asarray(jax.grad(loss)(k))
  eps = 1e-2
  for idx in [(0, 0, 0, 0), (1, 3, 2, 5), (0, 5, 3, 7)]:
    e = np.zeros(k.shape, np.float32)
    e[idx] = eps
    fd = (float(loss(k + e)) - float(loss(k - e))) / (2 * eps)
    np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-3)
