"""The host side of the non-finite guard (the device side is in ``train_step``: a step with a
non-finite loss or gradient norm leaves params and optimizer state unchanged and reports
``metrics['nonfinite']``).

``NonFiniteGuard`` keeps its counters *on device*, updated by a tiny jitted function after
every step (dispatched asynchronously like the step itself: no host sync), and reads them
only when the loop syncs anyway (log steps) and before every checkpoint save, so a save never
captures a run that has diverged. The counters are not part of ``TrainState`` (old
checkpoints restore unchanged); after a resume they start from zero.

Policies (``config.train.nonfinite``): ``'stop'`` raises ``NonFiniteError`` at the first
check after a non-finite step; ``'skip'`` trains on and raises only once more than
``config.train.max_skipped`` steps in a row were non-finite.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("gptjax")


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss / gradient norm (the run stopped before saving it)."""

  def __init__(self, message: str, *, step: int, last_finite_loss: Optional[float]):
    super().__init__(message)
    self.step, self.last_finite_loss = step, last_finite_loss


@jax.jit
def _observe(g: dict, metrics: dict, step) -> dict:
  bad = metrics["nonfinite"] > 0
  step = jnp.asarray(step, jnp.int32)
  run = jnp.where(bad, g["run"] + 1, 0)
  return dict(
      run=run,  # consecutive non-finite steps ending at the latest step
      max_run=jnp.maximum(g["max_run"], run),  # longest such streak since the start
      max_run_end=jnp.where(run > g["max_run"], step, g["max_run_end"]),
      first_bad=jnp.where((g["first_bad"] < 0) & bad, step, g["first_bad"]),
      total=g["total"] + bad.astype(jnp.int32),
      last_loss=jnp.where(bad, g["last_loss"], metrics["loss"].astype(jnp.float32)),
      last_loss_step=jnp.where(bad, g["last_loss_step"], step))


def _start(metrics: dict) -> dict:
  """Zero counters laid out like the step's (replicated) metrics: every process of a
  multi-host job holds the same values, so all of them raise at the same check."""
  z = jnp.zeros_like(metrics["nonfinite"], jnp.int32)
  return dict(run=z, max_run=z, max_run_end=z - 1, first_bad=z - 1, total=z,
              last_loss=jnp.full_like(metrics["loss"], jnp.nan, jnp.float32),
              last_loss_step=z - 1)


class NonFiniteGuard:
  """Counts non-finite steps on device; ``check`` applies the policy (a host sync)."""

  def __init__(self, c, ckpt_dir: str):
    self.policy = c.train.get("nonfinite", "stop")
    self.max_skipped = int(c.train.get("max_skipped", 10))
    self.lr, self.clip_norm = float(c.optim.lr), c.optim.clip_norm
    self.ckpt_dir = ckpt_dir
    self._g: Optional[dict] = None
    self._checked_at: Optional[int] = None
    self.total = 0

  def observe(self, step: int, metrics: dict) -> None:
    if self._g is None:
      self._g = jax.jit(_start)(metrics)
    self._g = _observe(self._g, metrics, np.int32(step))

  @property
  def counters(self) -> Optional[dict]:
    """The device-side counters (fetch them with the metrics, in one ``device_get``)."""
    return self._g

  def check(self, step: int, latest_ckpt: Callable[[], Optional[int]],
            g: Optional[dict] = None) -> None:
    """Raise ``NonFiniteError`` if the policy says stop. Called at log steps (``g`` fetched
    there with the metrics) and before every save -- the finite flag is a few scalars, so
    this extra fetch at save steps costs a sync but no bandwidth."""
    if self._checked_at == step:
      return
    if g is None:
      g = jax.device_get(self._g)
    self._checked_at = step
    if g is None:
      return
    g = {k: np.asarray(v).item() for k, v in g.items()}
    if g["total"] > self.total and self.policy == "skip":
      log.warning("step %d: %d non-finite step(s) skipped so far (params unchanged on those)",
                  step, g["total"])
    self.total = g["total"]
    if self.policy == "stop" and g["first_bad"] >= 0:
      raise self._error(g["first_bad"], g, latest_ckpt(),
                        f"step {g['first_bad']} had a non-finite loss or gradient norm "
                        "(config.train.nonfinite='stop')")
    if self.policy == "skip" and g["max_run"] > self.max_skipped:
      end = g["max_run_end"]
      over = end - (g["max_run"] - self.max_skipped - 1)  # where the streak went over
      raise self._error(over, g, latest_ckpt(),
                        f"{g['max_run']} steps in a row (up to step {end}) had a non-finite "
                        f"loss or gradient norm, more than config.train.max_skipped="
                        f"{self.max_skipped}")

  def _error(self, step: int, g: dict, latest: Optional[int], what: str) -> NonFiniteError:
    last = g["last_loss"] if g["last_loss_step"] >= 0 else None
    last_s = (f"the last finite loss was {last:.4g} at step {g['last_loss_step']}"
              if last is not None else "no step of this run had a finite loss")
    kept = (f"the checkpoints in {self.ckpt_dir} are kept (newest: step {latest}) and the "
            "same command resumes from it" if latest is not None else
            f"there is no checkpoint in {self.ckpt_dir}, so a rerun starts from scratch")
    clip = (f"--config.optim.clip_norm={self.clip_norm / 2:g} (now {self.clip_norm:g})"
            if self.clip_norm else "--config.optim.clip_norm=1.0 (now off)")
    return NonFiniteError(
        f"training diverged: {what}; {last_s}. Nothing from step {step} on was saved: "
        f"{kept}. Rerun with a lower learning rate, e.g. --config.optim.lr={self.lr / 10:g} "
        f"(now {self.lr:g}), and/or stronger gradient clipping, {clip}; or with "
        "--config.train.nonfinite=skip to skip such steps.",
        step=int(step), last_finite_loss=last)
