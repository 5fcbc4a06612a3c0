"""Distillation: the loss against a NumPy transcription, its invariants, and that a
distilled student beats the same student trained from scratch."""
import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gptjax
from gptjax.compress import distill
from gptjax.train.config import base_config, model_section, shapes_kwargs, vision_section


def _np_kd(s, t, T, mask=None):
  """T^2 * mean_tokens KL(softmax(t/T) || softmax(s/T)) in float64."""
  s = s.astype(np.float64) / T
  t = t.astype(np.float64) / T
  ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
  lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  if mask is None:
    return T * T * kl.mean()
  return T * T * (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_matches_numpy(T):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  t = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  mask = (rng.random((3, 5)) > 0.4).astype(np.float32)
  np.testing.assert_allclose(distill.kd_loss(s, t, temperature=T), _np_kd(s, t, T), rtol=1e-5)
  np.testing.assert_allclose(distill.kd_loss(s, t, temperature=T, mask=mask),
                             _np_kd(s, t, T, mask), rtol=1e-5)


def test_kd_loss_zero_for_identical_and_t2_scaling():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 4, 7)).astype(np.float32)
  t = rng.normal(size=(2, 4, 7)).astype(np.float32)
  assert float(distill.kd_loss(s, s, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)
  # The soft targets at temperature T of logits (T*x) equal those at 1 of x: the loss
  # differs exactly by the T^2 factor.
  for T in (2.0, 5.0):
    np.testing.assert_allclose(distill.kd_loss(T * s, T * t, temperature=T),
                               T * T * distill.kd_loss(s, t, temperature=1.0), rtol=1e-5)
  with pytest.raises(ValueError, match="temperature"):
    distill.kd_loss(s, t, temperature=0.0)


def test_incompatible_student_is_rejected():
  teacher = gptjax.preset("tiny")
  with pytest.raises(ValueError, match="vocab_size"):
    distill.check_compatible(teacher, dataclasses.replace(teacher, vocab_size=300))
  with pytest.raises(ValueError, match="VLM"):
    distill.check_compatible(dataclasses.replace(
        teacher, max_seq_len=128, vision=gptjax.VisionConfig(kind="cnn", image_size=16,
                                                             cnn_channels=(8, 8))), teacher)
  with pytest.raises(ValueError, match="alpha"):
    distill.make_distill_loss(None, None, alpha=1.5)


def _config(tmp_data, *, width, steps, lr):
  c = base_config()
  c.model = model_section("tiny", max_seq_len=128, width=width, num_heads=4, num_kv_heads=None,
                          mlp_dim=2 * width,
                          vision=vision_section(kind="cnn", image_size=16, cnn_channels=(8, 16),
                                                width=16))
  c.data.data_dir = str(tmp_data)
  c.data.builder_kwargs = shapes_kwargs(image_size=16, train_size=400, validation_size=64,
                                        test_size=64)
  c.data.pack = True
  c.data.prompt_len, c.data.target_len = 40, 60
  c.train.steps, c.train.batch_size, c.train.log_every = steps, 16, 10
  c.optim.lr, c.optim.warmup_steps = lr, 10
  c.checkpoint.every = 10_000
  c.eval.every, c.eval.decode_examples, c.eval.batch_size, c.eval.max_batches = 0, 0, 32, 2
  c.eval.at_end = True
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  return c


@pytest.mark.slow
def test_distillation_beats_training_from_scratch(tmp_path):
  from gptjax.train.load import load_model
  from gptjax.train.loop import run
  data = tmp_path / "data"
  teacher_cfg = _config(data, width=64, steps=250, lr=3e-3)
  run(teacher_cfg, str(tmp_path / "teacher"))
  teacher = load_model(str(tmp_path / "teacher"))
  # Same student, same data order, same steps: only the loss differs.
  student_cfg = _config(data, width=16, steps=60, lr=3e-3)
  scratch = run(student_cfg, str(tmp_path / "scratch"))
  distilled = distill.distill(student_cfg, str(tmp_path / "distilled"), teacher, alpha=0.9,
                              temperature=2.0)
  assert distilled["test"]["loss"] < scratch["test"]["loss"], (distilled["test"], scratch["test"])
