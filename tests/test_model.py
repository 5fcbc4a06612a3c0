"""GPT / VLM behaviour: causality, prefix-LM, weight sharing, image conditioning, metadata."""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptjax

TINY = gptjax.preset("tiny")
B, T = 2, 12
V = TINY.vocab_size
# 16 image tokens each, so image + text fits comfortably in tiny's max_seq_len=64.
CNN = gptjax.VisionConfig(kind="cnn", image_size=32, cnn_channels=(8, 16, 16))
VIT = gptjax.VisionConfig(kind="vit", image_size=32, patch_size=8, width=32, depth=1,
                          num_heads=4, mlp_dim=64)


def _tokens(seed, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _images(seed, b=B, size=32):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (b, size, size, 3)), jnp.float32)


def _params(model):
  return nnx.to_flat_state(nnx.state(model, nnx.Param))


def _count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _np(x):
  return np.asarray(x, np.float64)


# Jitted forward passes: one compilation per (model structure, input shape), shared by tests.
_fwd = nnx.jit(lambda m, x: m(x))
_fwd_img = nnx.jit(lambda m, x, img: m(x, image=img))


# ----------------------------------------------------------------------------- shapes
def test_gpt_forward_shape_and_dtype():
  model = gptjax.GPT(TINY, rngs=nnx.Rngs(0))
  logits = _fwd(model, _tokens(0))
  assert logits.shape == (B, T, V)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert len(model.blocks) == TINY.num_unique_layers
  # Eager (un-jitted) call agrees with the jitted one.
  np.testing.assert_allclose(_np(model(_tokens(0))), _np(logits), rtol=1e-5, atol=1e-5)


def test_different_seeds_different_models():
  a = _fwd(gptjax.GPT(TINY, rngs=nnx.Rngs(0)), _tokens(0))
  b = _fwd(gptjax.GPT(TINY, rngs=nnx.Rngs(1)), _tokens(0))
  assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- causality
CAUSAL_CFGS = [
    dict(attention="softmax", position="learned"),
    dict(attention="softmax", position="rope"),
    dict(attention="linear", position="learned", linear_chunk_size=4),
    dict(attention="linear", position="rope", linear_chunk_size=5),
]


@pytest.mark.parametrize("kw", CAUSAL_CFGS, ids=lambda kw: f"{kw['attention']}-{kw['position']}")
def test_gpt_causal(kw):
  cfg = dataclasses.replace(TINY, **kw)
  model = gptjax.GPT(cfg, rngs=nnx.Rngs(0))
  t0 = 5
  x = _tokens(1)
  x_future = x.at[:, t0 + 1:].set((x[:, t0 + 1:] + 7) % V)
  x_now = x.at[:, t0].set((x[:, t0] + 7) % V)
  a, b, c = (_np(_fwd(model, y)) for y in (x, x_future, x_now))
  np.testing.assert_allclose(a[:, :t0 + 1], b[:, :t0 + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, t0 + 1:], b[:, t0 + 1:], atol=1e-4)  # the future did change
  np.testing.assert_allclose(a[:, :t0], c[:, :t0], rtol=1e-5, atol=1e-5)
  assert np.abs(a[:, t0] - c[:, t0]).max() > 1e-4  # token t drives logits at t


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_rope_constant_sequence(attention):
  # RoPE rotates q and k only. With every token equal, all values are equal, so any
  # attention weighting returns the same vector: a RoPE model (no absolute positions) gives
  # identical logits at every position. Learned absolute positions break this symmetry.
  x = jnp.full((1, T), 42, jnp.int32)
  rope = gptjax.GPT(dataclasses.replace(TINY, position="rope", attention=attention),
                    rngs=nnx.Rngs(0))
  out = _np(_fwd(rope, x))[0]
  np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), rtol=1e-4, atol=1e-5)
  learned = gptjax.GPT(dataclasses.replace(TINY, attention=attention), rngs=nnx.Rngs(0))
  lo = _np(_fwd(learned, x))[0]
  assert not np.allclose(lo[0], lo[5], atol=1e-4)


def test_learned_positions_matter():
  # Shifting a sequence by one position changes logits (positions are part of the input).
  model = gptjax.GPT(TINY, rngs=nnx.Rngs(0))
  x = _tokens(2, b=1)
  shifted = jnp.concatenate([jnp.asarray([[3]], jnp.int32), x[:, :-1]], 1)
  a, b = _np(_fwd(model, x)), _np(_fwd(model, shifted))
  assert not np.allclose(a[0, :-1], b[0, 1:], atol=1e-4)


# ----------------------------------------------------------------------------- VLM
def _vlm_cfg(vision, **kw):
  return dataclasses.replace(TINY, vision=vision, **kw)


@pytest.mark.parametrize("vision", [CNN, VIT], ids=["cnn", "vit"])
def test_vlm_image_conditioning(vision):
  cfg = _vlm_cfg(vision)
  assert cfg.num_image_tokens == 16
  vlm = gptjax.VLM(cfg, rngs=nnx.Rngs(0))
  x = _tokens(3)
  img_a, img_b = _images(4), _images(5)
  a = _np(_fwd_img(vlm, x, img_a))
  assert a.shape == (B, T, V)
  assert np.isfinite(a).all()
  a2 = _np(_fwd_img(vlm, x, img_a))
  b = _np(_fwd_img(vlm, x, img_b))
  np.testing.assert_array_equal(a, a2)
  # Every text position sees the image, including the first one.
  assert np.abs(a - b).max(axis=-1).min() > 1e-5
  # Per-example conditioning: reversing the batch (tokens and images) reverses the logits.
  rev = _np(_fwd_img(vlm, x[::-1], img_a[::-1]))
  np.testing.assert_allclose(rev[::-1], a, rtol=1e-4, atol=1e-5)
  # Text-only use of the same model.
  t = _np(_fwd(vlm, x))
  assert t.shape == (B, T, V)
  assert np.isfinite(t).all()
  assert not np.allclose(t, a, atol=1e-4)


def test_vlm_text_only_equals_decoder():
  vlm = gptjax.VLM(_vlm_cfg(CNN), rngs=nnx.Rngs(0))
  x = _tokens(6)
  np.testing.assert_allclose(_np(_fwd(vlm, x)), _np(_fwd(vlm.decoder, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix_lm", [True, False])
def test_vlm_text_causal(prefix_lm):
  vlm = gptjax.VLM(_vlm_cfg(CNN, prefix_lm=prefix_lm), rngs=nnx.Rngs(0))
  x, img = _tokens(7), _images(8)
  t0 = 4
  a = _np(_fwd_img(vlm, x, img))
  b = _np(_fwd_img(vlm, x.at[:, t0 + 1:].set((x[:, t0 + 1:] + 11) % V), img))
  np.testing.assert_allclose(a[:, :t0 + 1], b[:, :t0 + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, t0 + 1:], b[:, t0 + 1:], atol=1e-4)


def test_vlm_prefix_lm_changes_image_attention():
  # Same weights, prefix_lm on vs off: bidirectional image attention changes what text sees.
  on = gptjax.VLM(_vlm_cfg(CNN, prefix_lm=True), rngs=nnx.Rngs(0))
  off = gptjax.VLM(_vlm_cfg(CNN, prefix_lm=False), rngs=nnx.Rngs(1))
  nnx.update(off, nnx.state(on, nnx.Param))
  x, img = _tokens(9), _images(10)
  np.testing.assert_allclose(_np(_fwd(on, x)), _np(_fwd(off, x)), rtol=1e-5, atol=1e-5)  # weights equal
  assert not np.allclose(_np(_fwd_img(on, x, img)), _np(_fwd_img(off, x, img)), atol=1e-4)


# ----------------------------------------------------------------------------- parameters
def _expected_params(cfg):
  """Parameter count from the config, written out by hand.

  Convention (GPT-2 style): every Dense has a bias; LayerNorm has scale+bias, RMSNorm scale;
  attention projections q: D->(N,H), k,v: D->(K,H), o: (N,H)->D; the vision tower is not
  counted here (text-only GPT).
  """
  D, N, K, Hd, F = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  Vs = cfg.vocab_size
  norm = 2 * D if cfg.norm == "layernorm" else D
  attn = (D * N * Hd + N * Hd) + 2 * (D * K * Hd + K * Hd) + (N * Hd * D + D)
  if cfg.mlp_activation == "gelu":
    mlp = (D * F + F) + (F * D + D)
  else:
    mlp = 2 * (D * F + F) + (F * D + D)
  block = 2 * norm + attn + mlp
  total = Vs * D + cfg.num_unique_layers * block + norm
  if cfg.position == "learned":
    total += cfg.max_total_len * D  # image + text positions
  if not cfg.tie_embeddings:
    total += D * Vs  # untied output head (no bias)
  return total, block


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_unique_layers=1),
    dict(depth=4, num_unique_layers=2),
    dict(position="rope", norm="rmsnorm", mlp_activation="swiglu"),
    dict(num_kv_heads=None, tie_embeddings=False),
    dict(num_kv_heads=1, mlp_dim=None, attention="linear"),
])
def test_param_count_formula(kw):
  cfg = dataclasses.replace(TINY, **kw)
  model = nnx.eval_shape(lambda: gptjax.GPT(cfg, rngs=nnx.Rngs(0)))
  assert _count(model) == _expected_params(cfg)[0]


def test_weight_sharing_param_count():
  shared = dataclasses.replace(TINY, depth=4, num_unique_layers=1)
  full = dataclasses.replace(TINY, depth=4, num_unique_layers=4)
  n_shared = _count(gptjax.GPT(shared, rngs=nnx.Rngs(0)))
  n_full = _count(gptjax.GPT(full, rngs=nnx.Rngs(0)))
  _, block = _expected_params(full)
  assert n_full - n_shared == 3 * block
  assert len(gptjax.GPT(shared, rngs=nnx.Rngs(0)).blocks) == 1


def _copy_into_unshared(src, dst, mapping):
  """dst gets src's non-block params, and dst.blocks[i] = copy of src.blocks[mapping[i]]."""
  src_flat = dict(_params(src))
  dst_state = nnx.state(dst, nnx.Param)
  new = {}
  for path, var in nnx.to_flat_state(dst_state):
    if path[0] == "blocks":
      src_path = ("blocks", mapping[int(path[1])]) + tuple(path[2:])
    else:
      src_path = path
    src_var = src_flat[src_path]
    assert src_var.get_value().shape == var.get_value().shape, (path, src_path)
    new[path] = src_var[...]
  for path, var in nnx.to_flat_state(dst_state):
    var.set_value(new[path])
  nnx.update(dst, dst_state)


@pytest.mark.parametrize("u,mapping", [(1, [0, 0, 0, 0]), (2, [0, 1, 0, 1])])
def test_weight_sharing_equals_copied_blocks(u, mapping):
  shared_cfg = dataclasses.replace(TINY, depth=4, num_unique_layers=u)
  full_cfg = dataclasses.replace(TINY, depth=4, num_unique_layers=4)
  shared = gptjax.GPT(shared_cfg, rngs=nnx.Rngs(0))
  full = gptjax.GPT(full_cfg, rngs=nnx.Rngs(1))
  x = _tokens(13)
  before = _np(_fwd(full, x))
  ref = _np(_fwd(shared, x))
  assert not np.allclose(before, ref, atol=1e-4)
  _copy_into_unshared(shared, full, mapping)
  np.testing.assert_allclose(_np(_fwd(full, x)), ref, rtol=1e-5, atol=1e-5)


def test_weight_sharing_block_order():
  # u=2, depth=4 uses blocks [0, 1, 0, 1] (i mod u), not [0, 0, 1, 1].
  shared = gptjax.GPT(dataclasses.replace(TINY, depth=4, num_unique_layers=2), rngs=nnx.Rngs(0))
  full = gptjax.GPT(dataclasses.replace(TINY, depth=4), rngs=nnx.Rngs(1))
  _copy_into_unshared(shared, full, [0, 0, 1, 1])
  x = _tokens(14)
  assert not np.allclose(_np(_fwd(full, x)), _np(_fwd(shared, x)), atol=1e-4)


def test_shared_block_gets_summed_gradient():
  # One shared block used twice receives gradient contributions from both uses; it must
  # equal the sum of the per-layer gradients of the equivalent unshared model.
  shared = gptjax.GPT(dataclasses.replace(TINY, num_unique_layers=1), rngs=nnx.Rngs(0))
  full = gptjax.GPT(TINY, rngs=nnx.Rngs(1))
  _copy_into_unshared(shared, full, [0, 0])
  x = _tokens(15)

  grad = nnx.jit(nnx.grad(lambda m, x: jnp.mean(m(x) ** 2)))
  gs = nnx.to_flat_state(grad(shared, x))
  gf = dict(nnx.to_flat_state(grad(full, x)))
  checked = 0
  for path, g in gs:
    if path[0] != "blocks":
      continue
    rest = tuple(path[2:])
    total = _np(gf[("blocks", 0) + rest][...]) + _np(gf[("blocks", 1) + rest][...])
    np.testing.assert_allclose(_np(g[...]), total, rtol=1e-3, atol=1e-6)
    checked += 1
  assert checked > 0


def test_logical_axes_on_every_param():
  cfgs = [TINY, dataclasses.replace(TINY, attention="linear", position="rope", norm="rmsnorm",
                                    mlp_activation="swiglu", tie_embeddings=False)]
  models = [gptjax.GPT(c, rngs=nnx.Rngs(0)) for c in cfgs]
  models += [nnx.eval_shape(lambda v=v: gptjax.VLM(_vlm_cfg(v), rngs=nnx.Rngs(0)))
             for v in (CNN, VIT)]
  for model in models:
    flat = _params(model)
    assert flat
    for path, var in flat:
      axes = var.get_metadata().get("logical_axes")
      assert axes is not None, f"{path} has no logical_axes"
      assert isinstance(axes, tuple), path
      shape = var.get_value().shape
      assert len(axes) == len(shape), (path, axes, shape)
      assert all(a is None or isinstance(a, str) for a in axes), (path, axes)


def test_vlm_has_vision_and_projector_params():
  vlm = nnx.eval_shape(lambda: gptjax.VLM(_vlm_cfg(VIT), rngs=nnx.Rngs(0)))
  n_vis = _count(vlm.vision)
  n_proj = _count(vlm.projector)
  n_dec = _count(vlm.decoder)
  assert n_vis > 0 and n_proj > 0
  assert n_dec == _expected_params(_vlm_cfg(VIT))[0]
  assert _count(vlm) == n_vis + n_proj + n_dec


def test_gpt2_small_eval_shape():
  start = time.perf_counter()
  model = nnx.eval_shape(lambda: gptjax.GPT(gptjax.preset("gpt2-small"), rngs=nnx.Rngs(0)))
  n = _count(model)
  elapsed = time.perf_counter() - start
  assert elapsed < 30, elapsed
  assert n == _expected_params(gptjax.preset("gpt2-small"))[0] == 124_439_808
  assert abs(n - 124.4e6) / 124.4e6 < 0.01
  # Abstract: nothing was allocated.
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
