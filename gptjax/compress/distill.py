"""Knowledge distillation (Hinton et al. 2015) from a frozen teacher into a student.

The loss on loss-masked tokens is
    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
optionally plus ``hidden_weight`` * MSE between the student's final hidden states, mapped
by a learned projection to the teacher's width, and the teacher's. The teacher runs live
inside the same jitted step on the same batch (no stale, precomputed logits), with its
parameters passed as a step argument (sharded like any parameters, never baked into the
program). Teacher and student may differ in width, depth, attention kind, weight sharing
and vision encoder; they must share the vocabulary.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import sharding as shd
from gptjax.batch import forward, token_losses
from gptjax.compress import hooks as compress_hooks
from gptjax.config import ModelConfig
from gptjax.layers.linear import Dense
from gptjax.model import from_config
from gptjax.train import config as train_config
from gptjax.train.hooks import RunHooks
from gptjax.train.loop import run


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 2.0,
            mask: Optional[jax.Array] = None) -> jax.Array:
  """T^2 * mean over (masked) tokens of KL(softmax(t/T) || softmax(s/T)); a scalar.

  The T^2 factor keeps the gradient scale of the soft targets independent of T.
  """
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  per_token = kd_per_token(student_logits, teacher_logits, temperature)
  if mask is None:
    return jnp.mean(per_token)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd_per_token(student_logits, teacher_logits, temperature: float) -> jax.Array:
  """T^2 * KL(p_t || p_s) for every position, in float32."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature**2 * kl


def check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(f"student vocab_size={student.vocab_size} is incompatible with the "
                     f"teacher's vocab_size={teacher.vocab_size}: distillation matches "
                     "token distributions, so both must share the vocabulary")
  if (teacher.vision is None) != (student.vision is None):
    raise ValueError("teacher and student must both be VLMs or both text-only "
                     f"(teacher vision={teacher.vision}, student vision={student.vision})")
  if teacher.vision is not None and (
      teacher.vision.image_size != student.vision.image_size
      or teacher.vision.channels != student.vision.channels):
    raise ValueError("teacher and student vision encoders must take the same images: "
                     f"image_size {teacher.vision.image_size} vs {student.vision.image_size}, "
                     f"channels {teacher.vision.channels} vs {student.vision.channels}")


class Student(nnx.Module):
  """The student plus, for hidden-state matching, a learned projection to the teacher's
  width. Trained as one module; ``.model`` is what is kept afterwards."""

  def __init__(self, model: nnx.Module, teacher_width: Optional[int] = None, *,
               rngs: nnx.Rngs):
    self.model = model
    cfg = model.config
    self.hidden_proj = (
        Dense((cfg.width,), (teacher_width,), ("embed", None), use_bias=False, rngs=rngs)
        if teacher_width is not None else None)

  @property
  def config(self) -> ModelConfig:
    return self.model.config

  def __call__(self, *args, **kwargs):
    return self.model(*args, **kwargs)


def make_distill_loss(teacher_graphdef, teacher_rest, *, alpha: float = 0.5,
                      temperature: float = 2.0, hidden_weight: float = 0.0):
  """``loss_fn(student, batch, teacher_params) -> (loss_sum, count)`` for ``make_train_step``.

  ``student`` is a ``Student``; returns token *sums* so gradient accumulation stays exact.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha} must be in [0, 1]")

  def loss_fn(student: Student, batch: dict, teacher_params):
    teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
    teacher.eval()
    t_logits, t_hidden = forward(teacher, batch, return_hidden=True)
    t_logits, t_hidden = jax.lax.stop_gradient((t_logits, t_hidden))
    s_logits, s_hidden = forward(student.model, batch, return_hidden=True)
    mask = batch["loss_mask"].astype(jnp.float32)
    per_token = (alpha * kd_per_token(s_logits, t_logits, temperature)
                 + (1.0 - alpha) * token_losses(s_logits, batch["targets"]))
    if hidden_weight and student.hidden_proj is not None:
      diff = student.hidden_proj(s_hidden).astype(jnp.float32) - t_hidden.astype(jnp.float32)
      per_token = per_token + hidden_weight * jnp.mean(jnp.square(diff), axis=-1)
    return jnp.sum(per_token * mask), jnp.sum(mask)

  return loss_fn


def student_model_fn(teacher_width: Optional[int]):
  """``model_fn`` building the ``Student`` wrapper (what distillation checkpoints hold)."""

  def model_fn(cfg, seed):
    return Student(from_config(cfg, seed), teacher_width, rngs=nnx.Rngs(seed + 7))

  return model_fn


def student_hooks(teacher_width: Optional[int] = None) -> RunHooks:
  """The hooks a distillation workdir was trained with, to load its student back:
  ``gptjax.load_model(workdir, hooks=student_hooks(teacher_width))``."""
  return RunHooks(model_fn=student_model_fn(teacher_width), eval_model=lambda m: m.model)


def distill(c, workdir: str, teacher: nnx.Module, *, alpha: float = 0.5,
            temperature: float = 2.0, hidden_weight: float = 0.0,
            init_params: Optional[nnx.State] = None, wrap_tx=None) -> dict:
  """Train the student described by training config ``c`` against ``teacher`` (frozen).

  Everything else — data, mesh, checkpoints / resume, eval, logs — is ``gptjax.train.run``;
  checkpoints hold the ``Student`` wrapper (student params under ``model``).
  ``init_params`` (the student's own params) starts from a given student, e.g. a pruned
  one; ``wrap_tx`` wraps the optimizer (e.g. ``prune.gradual_pruning``).
  """
  student_cfg = train_config.validate(c)
  compress_hooks.validate(c)
  check_compatible(teacher.config, student_cfg)
  t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  t_shardings = shd.state_shardings(t_params, mesh)
  t_params = jax.device_put(t_params, t_shardings)
  teacher_width = teacher.config.width if hidden_weight else None
  hooks = student_hooks(teacher_width).replace(
      init_params=None if init_params is None else nnx.State({"model": init_params}),
      wrap_tx=wrap_tx,
      loss_fn=make_distill_loss(t_graphdef, t_rest, alpha=alpha, temperature=temperature,
                                hidden_weight=hidden_weight),
      aux=t_params, aux_shardings=t_shardings)
  # What the student's config enables (e.g. gradual pruning in the recipe's fine-tune).
  return run(c, workdir, compress_hooks.hooks_for(c, hooks))
