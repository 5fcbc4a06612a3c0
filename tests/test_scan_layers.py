"""ModelConfig.scan_layers (blocks stored stacked, one lax.scan over the layers) and the
remat policies: the same values and gradients as the Python loop over separate blocks (the
reference: an independent code path over the same parameters); the layout conversions
(checkpoints of either layout restore into the other, the per-block transforms take a
scanned model). Compile time against depth is a benchmark (benchmarks/compile_depth.py),
not a timed test."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import gptjax
from gptjax.layout import loop_layout, to_layout, with_layout

TINY = gptjax.preset("tiny")
CNN = gptjax.VisionConfig(kind="cnn", image_size=8, cnn_channels=(8,), cnn_pools=1)  # 16 tokens
B, T = 2, 10


def _tokens(seed, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (b, t)), jnp.int32)


def _image(seed, b=B):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (b, 8, 8, 3)), jnp.float32)


def _scanned_twin(model, **changes):
  """A model of the same config with ``changes`` (scan_layers=True by default) holding the
  very same parameters (built from another seed, then overwritten in its layout)."""
  cfg = dataclasses.replace(model.config, **{"scan_layers": True, **changes})
  twin = gptjax.from_config(cfg, seed=123)
  nnx.update(twin, to_layout(nnx.state(model, nnx.Param), cfg.scan_layers))
  return twin


def _loss_grads_logits(model, tokens, image=None):
  """(loss, d loss / d params, logits, jaxpr text) through ``nnx.split`` and one jit."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    logits = m(tokens) if image is None else m(tokens, image)
    # A loss touching the logits unevenly, so every parameter gets a distinct gradient.
    lp = jax.nn.log_softmax(logits)
    return -jnp.mean(lp[..., 3] + 0.5 * lp[..., 7]), logits

  traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(params)
  (l, logits), g = traced.lower().compile()(params)
  return float(l), g, logits, str(traced.jaxpr)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def shared_gpt():
  """GPT, depth 3 with 2 unique blocks (layers 0 and 2 share block 0), softmax attention,
  and its no-remat loop results (the reference of the scan and remat tests)."""
  loop = gptjax.from_config(TINY.replace(depth=3, num_unique_layers=2), seed=0)
  return loop, _loss_grads_logits(loop, _tokens(0))


def _check_scan_matches_loop(loop, ref, image=None):
  l0, g0, z0, _ = ref
  l1, g1, z1, jaxpr = _loss_grads_logits(_scanned_twin(loop), _tokens(0), image)
  assert "scan" in jaxpr
  np.testing.assert_allclose(np.asarray(z1), np.asarray(z0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  _assert_trees_close(g0, to_layout(g1, False))
  return g1


def test_scan_matches_loop_gpt_softmax_shared_weights(shared_gpt):
  # The loop reference applies block 0 twice, so its gradient is the sum over both uses:
  # matching it checks that the scan sums through the stack, not just one use.
  loop, ref = shared_gpt
  _check_scan_matches_loop(loop, ref)


def test_scan_matches_loop_vlm_one_block():
  # (softmax: a linear-attention VLM costs 3x the compile here; linear attention goes
  # through the same scan body as any block)
  cfg = TINY.replace(depth=2, num_unique_layers=1, vision=CNN)
  loop = gptjax.from_config(cfg, seed=0)
  assert len(loop.decoder.blocks) == 1
  _check_scan_matches_loop(loop, _loss_grads_logits(loop, _tokens(0), _image(1)), _image(1))


# ('full', loop) is tests/test_remat.py's remat=True case.
@pytest.mark.parametrize("policy,scan", [("dots", False), ("full", True), ("dots", True)])
def test_remat_policies_match_no_remat(shared_gpt, policy, scan):
  loop, (l0, g0, _, _) = shared_gpt
  l1, g1, _, jaxpr = _loss_grads_logits(_scanned_twin(loop, scan_layers=scan, remat=policy),
                                        _tokens(0))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  _assert_trees_close(g0, to_layout(g1, False))  # float reassociation only
  # The policy is really applied: the backward recomputes under a checkpoint.
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  assert ("scan" in jaxpr) == scan


def test_stacked_layout_holds_block_i_at_index_i():
  # Checked by indexing, not through gptjax.layout: a seed gives the same weights in both
  # layouts, block i of the loop model at index i of every stacked array.
  cfg = TINY.replace(depth=3, num_unique_layers=2)
  loop = gptjax.from_config(cfg, seed=5)
  scan = gptjax.from_config(cfg.replace(scan_layers=True), seed=5)
  stacked = nnx.to_pure_dict(nnx.state(scan.blocks, nnx.Param))
  for i in range(2):
    sep = nnx.to_pure_dict(nnx.state(loop.blocks[i], nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b)),
                 stacked, sep)
  q = nnx.state(scan.blocks, nnx.Param)["attn"]["q"]["kernel"]
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
  # One array per parameter kind whatever the depth (what keeps the optimizer's compile flat).
  deep = nnx.eval_shape(lambda: gptjax.GPT(cfg.replace(depth=12, num_unique_layers=12,
                                                       scan_layers=True), rngs=nnx.Rngs(0)))
  assert (len(jax.tree.leaves(nnx.state(deep, nnx.Param)))
          == len(jax.tree.leaves(nnx.state(scan, nnx.Param))))
  # Layouts round-trip, also a raw Orbax pure dict with string block keys.
  back = with_layout(with_layout(loop, True), False)
  _assert_trees_close(nnx.state(loop, nnx.Param), nnx.state(back, nnx.Param), 0, 0)
  raw = {k: ({str(i): b for i, b in v.items()} if k == "blocks" else v)
         for k, v in nnx.to_pure_dict(nnx.state(loop, nnx.Param)).items()}
  _assert_trees_close(to_layout(raw, True), nnx.to_pure_dict(nnx.state(scan, nnx.Param)), 0, 0)


def test_scanned_model_generates_and_feeds_per_block_transforms(shared_gpt):
  loop, _ = shared_gpt
  scan = _scanned_twin(loop)
  prompt = _tokens(4, t=5)
  # Decoding loops over slices of the stack: the same greedy tokens as the loop model.
  np.testing.assert_array_equal(
      np.asarray(gptjax.generate(scan, prompt, max_new_tokens=4, temperature=0.0)),
      np.asarray(gptjax.generate(loop, prompt, max_new_tokens=4, temperature=0.0)))
  # Structured pruning takes the scanned model (its result has separate blocks).
  from gptjax.compress.prune import prune_neurons
  (cfg_a, a), (cfg_b, b) = prune_neurons(scan, 16), prune_neurons(loop, 16)
  assert cfg_a == cfg_b and not cfg_a.scan_layers
  _assert_trees_close(b, a, 0, 0)
  # GPT-2 export names h.<i> per block from either layout.
  from gptjax.interop import hf_gpt2
  gpt2 = TINY.replace(depth=2, vocab_size=64, num_kv_heads=TINY.num_heads)  # GPT-2: no GQA
  ref = dict(hf_gpt2.hf_tensors(gptjax.from_config(gpt2, seed=1)))
  got = dict(hf_gpt2.hf_tensors(gptjax.from_config(gpt2.replace(scan_layers=True), seed=1)))
  assert sorted(got) == sorted(ref) and "transformer.h.1.mlp.c_fc.weight" in got
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  assert loop_layout(loop) is loop


@pytest.mark.parametrize("saved_scan", [False, True])
def test_checkpoint_restores_into_the_other_layout(tmp_path, saved_scan):
  # A train state (parameters and AdamW moments) saved in one layout restores into a model
  # of the other, sharded over the 8-device test mesh, values exactly the saved ones.
  import optax
  from gptjax import sharding as shd
  from gptjax.train.checkpoint import Checkpointer, CheckpointMismatchError
  from gptjax.train.state import create_train_state, restore_train_state
  cfg = TINY.replace(depth=3, num_unique_layers=2)
  mesh = shd.make_mesh(2, 1, 4)
  tx = optax.adamw(1e-3)
  _, _, state, _ = create_train_state(cfg.replace(scan_layers=saved_scan), tx, mesh, 0)
  mu = jax.tree.map(lambda p: p + 1.0, state.params)  # moments distinct from the params
  state = state.replace(opt_state=(state.opt_state[0]._replace(mu=mu),) + state.opt_state[1:])
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
  ckpt.save(1, state, force=True)
  ckpt.wait()
  _, _, abstract, shardings = create_train_state(cfg.replace(scan_layers=not saved_scan), tx,
                                                 mesh, 0, abstract=True)
  restored = restore_train_state(ckpt, abstract)
  saved = nnx.to_pure_dict(state.params)
  got = to_layout(nnx.to_pure_dict(restored.params), saved_scan)
  _assert_trees_close(saved, got, 0, 0)
  _assert_trees_close(jax.tree.map(lambda x: x + 1.0, saved),
                      to_layout(nnx.to_pure_dict(restored.opt_state[0].mu), saved_scan), 0, 0)
  for x, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(sh, x.ndim)
  # A checkpoint of another model is still refused with the target's own error.
  _, _, other, _ = create_train_state(cfg.replace(width=64, num_heads=4), tx, mesh, 0,
                                      abstract=True)
  with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
    restore_train_state(ckpt, other)
  ckpt.close()


def test_bad_configs_name_the_field():
  with pytest.raises(ValueError, match=r"ModelConfig\.remat='some'.*'none', 'full', 'dots'"):
    gptjax.ModelConfig(remat="some")
  with pytest.raises(ValueError, match=r"ModelConfig\.dropout=0\.1.*scan_layers"):
    gptjax.ModelConfig(scan_layers=True, dropout=0.1)
  with pytest.raises(ValueError, match=r"ModelConfig\.scan_layers"):
    gptjax.ModelConfig(scan_layers="yes")
  # The old boolean remat (saved configs, configs/gpt2_small_tpu.py) still means the same.
  assert gptjax.ModelConfig(remat=True).remat == "full"
  assert gptjax.ModelConfig(remat=False).remat == "none"
  assert gptjax.ModelConfig(remat="True").remat == "full"  # --config.model.remat=True
  assert gptjax.ModelConfig(scan_layers=True, dropout=0.0).scan_layers
  from gptjax.compress.hooks import validate
  from gptjax.runs import base_config
  for section in ("qat", "prune"):
    c = base_config()
    c.model.scan_layers = True
    c[section].enabled = True
    with pytest.raises(ValueError, match=r"config\.model\.scan_layers=True is invalid.*"
                       rf"{section}\.enabled.*--config\.model\.scan_layers=False"):
      validate(c)
