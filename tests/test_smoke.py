"""Fast end-to-end smoke tests of the core install: build a GPT and a VLM, train 5 steps,
a checkpoint round trip, reload the trained model and generate from it.

Part of the normal suite, and the whole of ``make test-min``, which runs them against the
lowest dependency versions pyproject.toml declares (so a floor that is too low fails here).
Nothing here needs an extra (no matplotlib, tensorboardX or qwix).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptjax
from _train_helpers import (compile_cache_dir, persistent_compile_cache,  # noqa: F401
                            shapes_data_dir, tiny_vlm_config, to_numpy, train_rows)
from gptjax.train.checkpoint import Checkpointer, abstract_like

pytestmark = pytest.mark.smoke


def test_build_gpt_and_vlm_forward():
  cfg = gptjax.preset("tiny")
  gpt = gptjax.from_config(cfg)
  tokens = jnp.zeros((2, 8), jnp.int32)
  # Jitted forwards: one compile per model instead of one per eager op (~3x faster here).
  logits = nnx.jit(lambda m, t: m(t))(gpt, tokens)
  assert logits.shape == (2, 8, cfg.vocab_size)
  vcfg = cfg.replace(vision=gptjax.VisionConfig(kind="cnn", image_size=16))
  vlm = gptjax.from_config(vcfg)
  assert isinstance(vlm, gptjax.VLM) and isinstance(gpt, gptjax.GPT)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  vlogits = nnx.jit(lambda m, t, i: m(t, image=i))(vlm, tokens, images)
  assert vlogits.shape == (2, 8, cfg.vocab_size)
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(vlogits)).all()


def test_checkpoint_round_trip(tmp_path):
  state = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
           "b": jnp.asarray([1, 2, 3], jnp.int32), "step": jnp.asarray(5)}
  with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
    assert ckpt.save(5, state)
    ckpt.wait()
    assert ckpt.all_steps() == [5]
    restored = ckpt.restore(abstract_like(state))
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]), err_msg=k)
    assert restored[k].dtype == state[k].dtype


def test_train_five_steps_reload_and_generate(shapes_data_dir, tmp_path, compile_cache_dir):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  c.train.steps = 5
  c.checkpoint.every = 5
  c.data.eval_split = c.data.test_split = ""  # no final eval: keep it fast
  w = str(tmp_path / "run")
  with persistent_compile_cache(compile_cache_dir):
    summary = gptjax.runs.train(c, w)
  assert summary["step"] == 5, summary
  losses = [r["loss"] for r in train_rows(w)]
  assert len(losses) == 5 and all(np.isfinite(losses)), losses
  with Checkpointer(f"{w}/checkpoints", save_every=5) as ckpt:
    assert ckpt.all_steps() == [5]

  model = gptjax.load_model(w)
  assert isinstance(model, gptjax.VLM)
  trained = to_numpy(nnx.state(model, nnx.Param))
  fresh = to_numpy(nnx.state(gptjax.from_config(model.config), nnx.Param))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained),
                                                      jax.tree.leaves(fresh))), \
      "the reloaded model has its initial parameters: training or the restore did nothing"

  images = np.zeros((1, 16, 16, 3), np.float32)
  out = gptjax.generate(model, jnp.asarray([[1, 2, 3]], jnp.int32), 4, image=images)
  assert np.asarray(out).shape[0] == 1 and np.asarray(out).shape[-1] >= 4
