"""Gradual magnitude pruning (Zhu & Gupta 2017): the cubic sparsity schedule, and an Optax
wrapper whose state holds the masks, so they are checkpointed with the optimizer state.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from gptjax.compress.prune._select import check_int, check_nm, check_sparsity
from gptjax.compress.prune.masks import apply_masks, magnitude_masks, nm_masks

__all__ = ["cubic_schedule", "GradualPruningState", "GRADUAL_METHODS", "gradual_pruning",
           "find_masks"]


# -------------------------------------------------------------------- gradual pruning
def cubic_schedule(step, *, initial_sparsity: float = 0.0, final_sparsity: float,
                   begin_step: int, end_step: int, frequency: int = 1):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

  Piecewise constant: t is quantised down to t0 + k*frequency, so the value (and hence the
  masks of ``gradual_pruning``) changes at most every ``frequency`` steps; it reaches
  ``final_sparsity`` at ``end_step`` (= t0 + n dt) even if that is not on the grid, and stays
  there. Before ``begin_step`` it is 0 (no pruning). jit-safe: ``step`` may be traced;
  returns a float32 scalar. Bind the keywords with ``functools.partial``.
  """
  sf = check_sparsity(final_sparsity, "final_sparsity")
  si = check_sparsity(initial_sparsity, "initial_sparsity")
  if si > sf:
    raise ValueError(f"initial_sparsity={initial_sparsity!r} is invalid: must be <= "
                     f"final_sparsity={final_sparsity!r}")
  begin_step = check_int("begin_step", begin_step, 0)
  end_step = check_int("end_step", end_step, begin_step, None, " (>= begin_step)")
  frequency = check_int("frequency", frequency, 1)
  t = jnp.asarray(step, jnp.int32)
  tq = begin_step + ((jnp.clip(t, begin_step, end_step) - begin_step) // frequency) * frequency
  span = max(end_step - begin_step, 1)
  p = jnp.where(t >= end_step, 1.0, (tq - begin_step).astype(jnp.float32) / span)
  s = sf + (si - sf) * (1.0 - p) ** 3
  return jnp.where(t < begin_step, 0.0, s).astype(jnp.float32)


class GradualPruningState(NamedTuple):
  """Optimizer state of ``gradual_pruning``: checkpointed with the rest of ``opt_state``."""
  count: jax.Array  # int32: updates done (the step the schedule is evaluated at)
  sparsity: jax.Array  # float32: the scheduled sparsity the masks were last computed for
  masks: Any  # bool tree mirroring params (Variables kept)
  inner_state: Any


GRADUAL_METHODS = ("global", "layerwise", "n_m")


def gradual_pruning(inner: optax.GradientTransformation,
                    schedule_fn: Union[Callable[[jax.Array], jax.Array], float],
                    method: str = "global", *, n: int = 2, m: int = 4,
                    include_embeddings: bool = False) -> optax.GradientTransformation:
  """Wrap ``inner`` (e.g. AdamW) so training prunes gradually and pruned weights stay zero.

  At each ``update(grads, state, params)`` (``params`` required):
  1. gradients of pruned weights are zeroed, and ``inner`` computes its update;
  2. if ``schedule_fn(count)`` differs from the sparsity the masks were made for (a
     ``lax.cond``: usually no work), new masks are computed at that sparsity from the
     magnitudes of the *updated* params, with weights pruned already ranked lowest and the
     old mask ANDed in: masks only shrink. ``method``: 'global' | 'layerwise' magnitude,
     pruning ``round(s * n)`` weights as ``global_magnitude`` / ``layerwise_magnitude`` do
     (``masks.num_pruned``: torch's count, for the float32 scheduled ``s``), or 'n_m' (the
     N:M pattern, imposed once the schedule is > 0; its amount is fixed);
  3. the returned update is ``where(mask, u, -params)``, so ``params + update`` is exactly
     zero where pruned -- momentum and weight decay cannot regrow a pruned weight.

  The masks live in the optimizer state (``GradualPruningState``), so they are saved and
  restored with the checkpoint. jit-compatible. ``find_masks(opt_state)`` returns them.
  """
  if method not in GRADUAL_METHODS:
    raise ValueError(f"method={method!r} is invalid: allowed values are "
                     f"{', '.join(map(repr, GRADUAL_METHODS))}")
  if method == "n_m":
    n, m = check_nm(n, m)
  if not callable(schedule_fn):
    const = check_sparsity(schedule_fn, "schedule_fn")
    schedule_fn = lambda step: jnp.float32(const)  # noqa: E731

  def init_fn(params):
    masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    return GradualPruningState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), masks,
                               inner.init(params))

  def new_masks(params, s, old):
    if method == "n_m":
      nm = nm_masks(params, n, m, include_embeddings=include_embeddings, masks=old)
      return jax.tree.map(lambda a, b: jnp.where(s > 0, a, b), nm, old)
    return magnitude_masks(params, s, per_layer=method == "layerwise",
                            include_embeddings=include_embeddings, masks=old)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("gradual_pruning needs params: call update(grads, state, params)")
    grads = apply_masks(updates, state.masks)
    inner_updates, inner_state = inner.update(grads, state.inner_state, params)
    candidate = optax.apply_updates(params, inner_updates)
    s = jnp.asarray(schedule_fn(state.count), jnp.float32)
    masks = jax.lax.cond(s != state.sparsity, lambda: new_masks(candidate, s, state.masks),
                         lambda: state.masks)
    final = jax.tree.map(
        lambda mk, u, p: jnp.where(mk, u, -jnp.asarray(p).astype(u.dtype)),
        masks, inner_updates, params)
    return final, GradualPruningState(state.count + 1, s, masks, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def find_masks(opt_state):
  """The masks held by the first ``GradualPruningState`` inside ``opt_state`` (or None)."""
  is_gp = lambda x: isinstance(x, GradualPruningState)  # noqa: E731
  for x in jax.tree.leaves(opt_state, is_leaf=is_gp):
    if is_gp(x):
      return x.masks
  return None
