"""The optimizer from config: AdamW + warmup/cosine schedule + global-norm clipping."""
from __future__ import annotations

import jax
import optax


def schedule(c) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, cosine decay to ``lr * end_lr_ratio`` at ``train.steps``."""
  o = c.optim
  warmup = min(o.warmup_steps, max(c.train.steps - 1, 0))
  if o.end_lr_ratio == 1.0:
    # No decay: written as a constant (after the warmup) rather than a cosine of zero
    # amplitude, the same values, but the compiled step then does not depend on
    # train.steps (the cosine's length), so runs that differ only in their length, or a
    # run resumed with more steps, reuse one compiled program (the persistent cache).
    if warmup == 0:
      return optax.constant_schedule(o.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(c.train.steps, warmup + 1), end_value=o.lr * o.end_lr_ratio)


def decay_mask(params):
  # Decay matrices / kernels only: biases and norm scales are 1-D (nanoGPT's rule).
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(c) -> optax.GradientTransformation:
  o = c.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
      optax.adamw(schedule(c), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask),
  )
