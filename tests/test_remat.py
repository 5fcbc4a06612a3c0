"""Remat (recompute each block in the backward pass) must not change values or gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptjax


def _loss_and_grads(cfg, tokens):
  model = gptjax.GPT(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_matches_plain_forward_and_gradients():
  cfg = gptjax.preset("tiny")
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  l0, g0 = _loss_and_grads(cfg, tokens)
  l1, g1 = _loss_and_grads(dataclasses.replace(cfg, remat=True), tokens)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)  # float reassociation only
  # Remat is visible in the traced program: the backward recomputes under a checkpoint.
  model = nnx.eval_shape(lambda: gptjax.GPT(dataclasses.replace(cfg, remat=True),
                                            rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).sum()))(params)
  assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)
