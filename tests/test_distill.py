"""Distillation: the loss against a NumPy transcription, its invariants and input checks,
and a distilled student beating the same student trained from scratch."""
import dataclasses
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gptjax
from gptjax.compress import distill


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



@pytest.mark.slow
def test_distillation_beats_training_from_scratch(tmp_path):
  """Same student, same 128 training records, same 400 steps, seed and batches: with the
  frozen teacher's soft targets (alpha 0.7, T 2) its test loss ends lower than without them,
  and lower than the best the from-scratch run reached at any of its evaluations (every 50
  steps) — so this is not only distillation resisting an overfitting early stopping would fix.

  The teacher (width 64, 4.1x the student's parameters) trained on 1024 records; the
  student's transfer set is the first 128 of them. That is what distillation is for: handing
  a small model what a larger one learned from more than the small one's budget covers.
  This is the n = 128 row of benchmarks/distill_vs_scratch.py. Measured when written (2-core
  CPU, this 8-device mesh): teacher 0.444; from scratch 0.725 at the end, best 0.619 (step
  250); distilled 0.556. (Trained on all 1024 records, distilled still wins but narrowly,
  0.500 vs 0.525, too close to assert: see BENCHMARKS.md.)
  """
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  from distill_vs_scratch import compare, train_teacher
  teacher, teacher_loss = train_teacher(str(tmp_path), steps=400)
  r = compare(str(tmp_path), teacher, transfer=128, steps=400, alpha=0.7, temperature=2.0)
  scratch, kd = r["scratch"], r["distilled"]
  assert sorted(scratch) == sorted(kd) == list(range(50, 401, 50))
  assert teacher_loss < kd[400]  # sanity: the smaller student does not beat its teacher
  assert kd[400] < 0.9 * scratch[400], (kd, scratch)
  assert kd[400] < min(scratch.values()), (kd, scratch)
