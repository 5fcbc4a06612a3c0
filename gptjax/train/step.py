"""Pure train / eval steps: functions of (state, batch) only, jitted with explicit shardings.

Batch keys: ``inputs`` (B, T) int32, ``targets`` (B, T) int32, ``loss_mask`` (B, T) float32,
optional ``image`` (B, H, W, C) uint8 (4x cheaper to move to the device than float32;
scaled to [0, 1] inside the step), optional ``segment_ids`` / ``positions`` (B, T) int32
for padded or packed rows.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax.train.state import TrainState

MODEL_KEYS = ("inputs", "targets", "loss_mask", "image", "segment_ids", "positions")


def image_to_float(image: jax.Array) -> jax.Array:
  if jnp.issubdtype(image.dtype, jnp.integer):
    return image.astype(jnp.float32) / 255.0
  return image


def forward(model: nnx.Module, batch: dict, *, return_hidden: bool = False):
  """Text logits (B, T, V) float32 for a GPT or VLM (with the batch's image if present,
  and its segment ids / positions for padded or packed rows)."""
  kw = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
  if "image" in batch:
    kw["image"] = image_to_float(batch["image"])
  return model(batch["inputs"], return_hidden=return_hidden, **kw)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_sums(model, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies, number of masked tokens)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(token_losses(forward(model, batch), batch["targets"]) * mask), jnp.sum(mask)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    loss_fn: Callable | None = None):
  """Build ``train_step(state, batch) -> (state, metrics)``.

  The loss is the mean cross-entropy over *all* masked tokens of the global batch. With
  ``accum_steps`` > 1 the batch is split into micro-batches whose gradients of the loss
  *sum* are accumulated in a ``lax.scan`` and divided by the total token count once, so the
  update equals the full-batch one exactly while activation memory is 1/accum_steps.
  ``loss_fn(model, batch, aux) -> (loss_sum, count)`` may replace the cross-entropy; ``aux``
  is the step's optional third argument, passed through unchanged (e.g. the frozen teacher's
  parameters for distillation, so they are a jit argument with their own shardings rather
  than constants baked into the program).
  """
  loss_fn = loss_fn or (lambda model, batch, aux: loss_sums(model, batch))

  def sum_and_grad(params, micro, key, aux):
    def f(p):
      # Fresh Variable objects for `rest` at this trace level: NNX refuses to mutate (reseed)
      # Variables created outside the current trace.
      model = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
      nnx.reseed(model, dropout=key)  # fresh dropout masks per (seed, step, micro-batch)
      return loss_fn(model, micro, aux)
    (total, count), grads = jax.value_and_grad(f, has_aux=True)(params)
    return total, count, grads

  def train_step(state: TrainState, batch: dict, aux=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = {k: v for k, v in batch.items() if k in MODEL_KEYS}
    if accum_steps == 1:
      total, count, grads = sum_and_grad(state.params, batch, key, aux)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        t, c, g = sum_and_grad(state.params, mb, jax.random.fold_in(key, i), aux)
        acc_t, acc_c, acc_g = carry
        return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
      (total, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads),
               "tokens": count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef, rest, select: Callable = lambda m: m):
  """``eval_step(params, batch) -> (loss_sum, count)`` (no dropout); ``select`` picks the
  model to evaluate out of the trained module (e.g. the student inside a wrapper)."""

  def eval_step(params, batch):
    model = select(nnx.merge(graphdef, params, rest))
    model.eval()
    batch = {k: v for k, v in batch.items() if k in MODEL_KEYS}
    return loss_sums(model, batch)

  return eval_step


def jit_train_step(step_fn, state_shardings, batch_shardings: dict[str, Any], mesh,
                   aux_shardings=None):
  """jit with explicit shardings; the state is donated (updated in place on device)."""
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if aux_shardings is None:
    return jax.jit(lambda s, b: step_fn(s, b), in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, aux_shardings),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))
