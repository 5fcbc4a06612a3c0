"""ModelConfig.scan_layers (one lax.scan over the layers) and the remat policies: the same
values and gradients as the Python loop over the blocks (the reference: an independent code
path over the same parameters), the same parameter tree. Compile time against depth is a benchmark
(benchmarks/compile_depth.py), not a timed test."""
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

TINY = gptjax.preset("tiny")
CNN = gptjax.VisionConfig(kind="cnn", image_size=8, cnn_channels=(8,), cnn_pools=1)  # 16 tokens
B, T = 2, 10


def _tokens(seed, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (b, t)), jnp.int32)


def _image(seed, b=B):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (b, 8, 8, 3)), jnp.float32)


def _scanned_twin(model, **changes):
  """A model of the same config with ``changes`` (scan_layers=True by default) holding the
  very same parameters (built from another seed, then overwritten)."""
  cfg = dataclasses.replace(model.config, **{"scan_layers": True, **changes})
  twin = gptjax.from_config(cfg, seed=123)
  nnx.update(twin, nnx.state(model, nnx.Param))
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
  _assert_trees_close(g0, g1)
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
  _assert_trees_close(g0, g1)  # float reassociation only
  # The policy is really applied: the backward recomputes under a checkpoint.
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  assert ("scan" in jaxpr) == scan


def test_checkpoint_of_loop_model_restores_into_scanned(tmp_path, shared_gpt):
  # (decoding does not scan, so generation is the loop's by construction: not re-tested)
  loop, _ = shared_gpt
  path = os.path.abspath(tmp_path / "params")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, nnx.to_pure_dict(nnx.state(loop, nnx.Param)))
  ckpt.wait_until_finished()
  cfg = dataclasses.replace(loop.config, scan_layers=True)
  abstract = nnx.eval_shape(lambda: gptjax.GPT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  assert (jax.tree.structure(nnx.state(abstract, nnx.Param))
          == jax.tree.structure(nnx.state(loop, nnx.Param)))
  nnx.replace_by_pure_dict(state, ocp.StandardCheckpointer().restore(path))
  scan = nnx.merge(graphdef, state)
  assert scan.config.scan_layers
  _assert_trees_close(nnx.state(loop, nnx.Param), nnx.state(scan, nnx.Param), 0, 0)
  tokens = _tokens(3, t=5)
  np.testing.assert_allclose(np.asarray(scan(tokens)), np.asarray(loop(tokens)),
                             rtol=1e-5, atol=1e-5)


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
