"""Cached decoding and sampling against repeated full forward passes (the uncached path)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptjax
from gptjax.generate import generate

TINY = gptjax.preset("tiny")
V = TINY.vocab_size
B, T, NEW = 2, 6, 8
CNN = gptjax.VisionConfig(kind="cnn", image_size=32, cnn_channels=(8, 16, 16))  # 16 tokens


def _tokens(seed, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _images(seed, b=B):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (b, 32, 32, 3)), jnp.float32)


_fwd = nnx.jit(lambda m, x: m(x))
_fwd_img = nnx.jit(lambda m, x, img: m(x, image=img))
_decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))
_decode_img = nnx.jit(lambda m, x, cache, img: m.decode(x, cache, image=img))


def _full(model, seq, image):
  return _fwd(model, seq) if image is None else _fwd_img(model, seq, image)


def _greedy_reference(model, tokens, n, image=None):
  """Uncached greedy: rerun the full model on the whole sequence for every new token.

  The sequence lives in a fixed-length buffer (so one compilation serves every step); the
  not-yet-generated tail is filler that a causal model cannot see (causality is tested in
  test_model.py).
  """
  b, t = tokens.shape
  seq = np.zeros((b, t + n), np.int32)
  seq[:, :t] = np.asarray(tokens)
  out, last_logits = [], []
  for i in range(n):
    logits = np.asarray(_full(model, jnp.asarray(seq), image)[:, t + i - 1], np.float64)
    nxt = logits.argmax(-1).astype(np.int32)
    out.append(nxt)
    last_logits.append(logits)
    seq[:, t + i] = nxt
  return np.stack(out, 1), np.stack(last_logits, 1)


def _make(kind, attention="softmax", **kw):
  cfg = dataclasses.replace(TINY, attention=attention, linear_chunk_size=4, **kw)
  if kind == "gpt":
    return gptjax.from_config(cfg, seed=0), None
  vlm = gptjax.from_config(dataclasses.replace(cfg, vision=CNN), seed=0)
  return vlm, _images(1)


CASES = [("gpt", "softmax"), ("gpt", "linear"), ("vlm", "softmax"), ("vlm", "linear")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def model_case(request):
  kind, attention = request.param
  model, image = _make(kind, attention)
  tokens = _tokens(6)  # a prompt whose greedy steps have no near-ties (top-2 gap > 1e-3)
  ref_tokens, ref_logits = _greedy_reference(model, tokens, NEW, image)
  return model, image, tokens, ref_tokens, ref_logits


def _margin_ok(ref_logits):
  # Top-2 gap of every greedy step: if two logits (nearly) tie, float noise may flip argmax.
  top2 = np.sort(ref_logits, -1)[..., -2:]
  return (top2[..., 1] - top2[..., 0]).min() > 1e-4


def test_cached_greedy_equals_full_forward(model_case):
  model, image, tokens, ref_tokens, ref_logits = model_case
  assert _margin_ok(ref_logits), "reference has a near-tie; pick another seed"
  out = generate(model, tokens, NEW, image=image)
  out = np.asarray(out)
  assert out.shape == (B, NEW)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, ref_tokens)


def test_decode_logits_equal_full_forward(model_case):
  # Lower level: prefill, then one token at a time; logits match the full forward pass.
  model, image, tokens, ref_tokens, ref_logits = model_case
  p = model.config.num_image_tokens if image is not None else 0
  cache = model.init_cache(B, p + T + NEW)
  if image is None:
    logits, cache = _decode(model, tokens, cache)
  else:
    logits, cache = _decode_img(model, tokens, cache, image)
  assert logits.shape == (B, V)
  np.testing.assert_allclose(np.asarray(logits, np.float64), ref_logits[:, 0], rtol=1e-4,
                             atol=1e-4)
  for i in range(NEW - 1):
    logits, cache = _decode(model, jnp.asarray(ref_tokens[:, i:i + 1]), cache)
    np.testing.assert_allclose(np.asarray(logits, np.float64), ref_logits[:, i + 1],
                               rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


@pytest.mark.parametrize("attention,position", [("softmax", "rope"), ("linear", "learned")])
def test_decode_in_chunks(attention, position):
  # Several multi-token decode calls (chunked prefill) == one full forward pass.
  model, _ = _make("gpt", attention, position=position)
  x = _tokens(3, t=11)
  full = np.asarray(_fwd(model, x), np.float64)
  cache = model.init_cache(B, 16)
  for lo, hi in [(0, 4), (4, 5), (5, 11)]:
    logits, cache = _decode(model, x[:, lo:hi], cache)
    np.testing.assert_allclose(np.asarray(logits, np.float64), full[:, hi - 1], rtol=1e-4,
                               atol=1e-4, err_msg=f"chunk {lo}:{hi}")


def test_prompt_lengths_share_compiled_programs():
  """Prompts are padded to power-of-two buckets: another length in the same bucket compiles
  nothing; the next bucket compiles only a prefill while the total fits the same
  power-of-two cache (here 64 slots). Each output still equals the uncached greedy
  reference of its own prompt."""
  from gptjax.generate import _decode, _prefill
  model = _make("gpt", position="rope")[0]  # rope: no learned-table cap on the buckets
  counts = lambda: (_prefill._cache_size(), _decode._cache_size())  # noqa: E731
  for i, t in enumerate((5, 12, 20)):  # buckets 16, 16, 32; cache 16 + 32 -> 64, 32 + 32 = 64
    x = _tokens(10 + t, b=1, t=t)
    before = counts()
    out = np.asarray(generate(model, x, 20))
    ref, logits = _greedy_reference(model, x, 20)
    if _margin_ok(logits):
      np.testing.assert_array_equal(out, ref)
    new_prefill, new_decode = np.subtract(counts(), before)
    if i:  # (the first call's programs may exist already: another test's, same shapes)
      assert new_prefill == (1 if t == 20 else 0), (t, new_prefill)
      assert new_decode == 0, (t, new_decode)


# ----------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def gpt():
  return _make("gpt")[0]


@pytest.fixture(scope="module")
def greedy16(gpt):
  return np.asarray(generate(gpt, _tokens(4), 16, temperature=0.0))


def test_top_k_1_is_greedy(gpt, greedy16):
  out = generate(gpt, _tokens(4), 16, temperature=1.0, top_k=1, seed=3)
  np.testing.assert_array_equal(np.asarray(out), greedy16)


def test_tiny_top_p_is_greedy(gpt, greedy16):
  out = generate(gpt, _tokens(4), 16, temperature=1.0, top_p=1e-6, seed=5)
  np.testing.assert_array_equal(np.asarray(out), greedy16)


def test_seeds(gpt, greedy16):
  a = np.asarray(generate(gpt, _tokens(4), 16, temperature=1.0, seed=0))
  a2 = np.asarray(generate(gpt, _tokens(4), 16, temperature=1.0, seed=0))
  b = np.asarray(generate(gpt, _tokens(4), 16, temperature=1.0, seed=1))
  np.testing.assert_array_equal(a, a2)
  assert a.shape == (B, 16)
  assert (a >= 0).all() and (a < V).all()
  assert not np.array_equal(a, b)
  assert not np.array_equal(a, greedy16)  # an untrained tiny model is near-uniform


def test_stop_token(gpt, greedy16):
  stop = int(greedy16[0, 3])
  out = np.asarray(generate(gpt, _tokens(4), 16, temperature=0.0, stop_token=stop))
  assert out.shape == (B, 16)
  for b in range(B):
    hits = np.flatnonzero(greedy16[b] == stop)
    if hits.size == 0:
      np.testing.assert_array_equal(out[b], greedy16[b])
      continue
    first = hits[0]
    np.testing.assert_array_equal(out[b, :first + 1], greedy16[b, :first + 1])
    assert (out[b, first:] == stop).all(), out[b]
  assert (out[0, 3:] == stop).all()


def test_generate_too_long_raises(gpt):
  x = _tokens(7)
  with pytest.raises(ValueError):
    generate(gpt, x, TINY.max_seq_len - T + 2)
  with pytest.raises(ValueError):
    gpt.init_cache(B, TINY.max_seq_len + 1)


def test_generate_max_length_ok(gpt):
  x = _tokens(7)
  out = generate(gpt, x, TINY.max_seq_len - T)  # exactly fills the learned positions
  assert np.asarray(out).shape == (B, TINY.max_seq_len - T)
