"""``run(config, workdir)``: the whole training job — data, sharded state, the jitted step,
checkpoints (resume / preemption), periodic eval, logs and plots."""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx

from gptjax import sharding as shd
from gptjax.flops import flops_per_step
from gptjax.batch import MODEL_KEYS, batch_shardings, check_batch, global_batch
from gptjax.train import draw_data
from gptjax.train import evaluate as ev
from gptjax.train.checkpoint import Checkpointer, CheckpointCorruptError, CheckpointSaveError
from gptjax.train.config import eval_every, validate
from gptjax.train.data import load_split, pipeline_for
from gptjax.train.guard import NonFiniteError, NonFiniteGuard
from gptjax.train.hooks import RunHooks
from gptjax.train.load import save_run_config
from gptjax.train.lock import (WorkdirLockedError, WorkdirNotWritableError, acquire,
                               check_writable, not_writable)
from gptjax.train.metrics import MetricsLogger, Throughput, plot_losses
from gptjax.train.optim import make_optimizer, schedule
from gptjax.train.preemption import PreemptionWatcher
from gptjax.train.state import create_train_state, restore_train_state
from gptjax.train.step import jit_train_step, make_train_step

log = logging.getLogger("gptjax")

# Failures whose message says how to recover: a CLI prints the message and exits 1, with no
# traceback (train.py, the recipe).
RUN_ERRORS = (NonFiniteError, CheckpointCorruptError, CheckpointSaveError,
              WorkdirLockedError, WorkdirNotWritableError)


class _Progress:
  """tqdm on process 0 when enabled, else periodic log lines."""

  def __init__(self, enabled: bool, total: int, initial: int):
    self.bar = None
    if enabled and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

  def update_to(self, step: int, postfix: Optional[dict] = None):
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    elif jax.process_index() == 0:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def resolve_dirs(workdir: str) -> tuple[str, str]:
  """(checkpoint workdir, local log dir). A remote workdir (``gs://...``, what Cloud TPU
  runs use) holds the checkpoints (Orbax writes there directly); metrics, TensorBoard
  events and plots then go to the local ``runs/<name>``, since appending to object storage
  is not possible."""
  if "://" in workdir:
    logdir = os.path.join("runs", workdir.rstrip("/").rsplit("/", 1)[-1])
  else:
    workdir = logdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(logdir, exist_ok=True)
  except OSError as e:
    raise not_writable(logdir, e) from e
  return workdir, logdir


def _prepare_workdir(workdir: str, logdir: str) -> None:
  """Fail before any training if the run could not write its logs or checkpoints (a probe
  file in each directory; the checkpoints directory itself is created later, by the first
  Checkpointer, so that a run failing on its config leaves none behind)."""
  check_writable(logdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if "://" not in workdir and os.path.isdir(ckpt_dir):
    check_writable(ckpt_dir)
  elif "://" not in workdir and os.path.exists(ckpt_dir):
    raise not_writable(ckpt_dir, NotADirectoryError(20, "exists and is not a directory"))


def run(c, workdir: str, hooks: Optional[RunHooks] = None) -> dict:
  """Train to ``c.train.steps`` (resuming from ``workdir`` if it has a checkpoint).

  ``hooks`` change what is trained (``RunHooks``); compression switched on in the config
  (``config.qat`` / ``config.prune``) reaches here only through them — ``gptjax.runs.train``
  composes those from the config.

  Returns a summary dict: final step, last train loss, final eval/test metrics,
  ``preempted`` (True if SIGTERM stopped the run after saving), ``skipped_steps`` (steps
  with a non-finite loss / gradient norm, not applied; ``train.nonfinite='skip'``).

  Failures raise named errors before any training where possible: ``WorkdirLockedError``
  (another run holds ``<workdir>/.gptjax.lock``), ``WorkdirNotWritableError``,
  ``CheckpointCorruptError``; during training ``NonFiniteError`` and
  ``CheckpointSaveError``. Each message says how to recover.
  """
  shd.maybe_initialize_distributed()
  mcfg = validate(c)
  workdir, logdir = resolve_dirs(workdir)
  _prepare_workdir(workdir, logdir)
  lock = acquire(workdir)  # before anything is written: one run per workdir
  try:
    return _run(c, mcfg, workdir, logdir, hooks)
  finally:
    lock.release()


def _run(c, mcfg, workdir: str, logdir: str, hooks: Optional[RunHooks]) -> dict:
  save_run_config(c, logdir)
  mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  shardings = batch_shardings(mesh)
  if c.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"config.train.batch_size={c.train.batch_size} must divide by the "
                     f"data*fsdp mesh size {mesh.shape['data'] * mesh.shape['fsdp']}")

  train_src = load_split(c, c.data.train_split)
  draw = None
  if draw_data.enabled(c):  # the image tokenizer is trained (or loaded) before the LM
    draw = draw_data.prepare(c, logdir, train_src)
    train_data = draw_data.pipeline(c, train_src, draw, batch_size=c.train.batch_size)
  else:
    train_data = pipeline_for(c, train_src, train=True, batch_size=c.train.batch_size)
  hooks = hooks or RunHooks()
  tx = make_optimizer(c)
  if hooks.wrap_tx is not None:
    tx = hooks.wrap_tx(tx)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.every,
                      keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  resuming = ckpt.latest_step() is not None  # then the init is never run: restored over
  graphdef, rest, state, state_sh = create_train_state(
      mcfg, tx, mesh, c.seed, model_fn=hooks.model_fn,
      init_params=None if resuming else hooks.init_params, abstract=resuming)
  if resuming:
    state = _resume(c, ckpt, state, train_data.iterator)
    log.info("resumed from step %d in %s", int(state.step), workdir)

  # The step's input shardings must mirror the batch exactly: text-only (lm) batches have
  # no image, padded/packed ones carry segment ids; take the keys from the first batch.
  first_batch = next(train_data)
  check_batch(first_batch, mcfg)  # named errors, not XLA shape errors at compile time
  train_shardings = {k: shardings[k] for k in MODEL_KEYS if k in first_batch}
  train_step = jit_train_step(
      make_train_step(graphdef, rest, tx, accum_steps=c.optim.accum_steps, loss_fn=hooks.loss_fn,
                      contrastive_weight=c.train.get("contrastive_weight", 0.0)),
      state_sh, train_shardings, mesh, aux_shardings=hooks.aux_shardings)
  step_args = () if hooks.aux_shardings is None else (hooks.aux,)
  lr_at = schedule(c)
  logger = MetricsLogger(logdir, tensorboard=c.logging.tensorboard)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = int(state.step)
  progress = _Progress(c.logging.progress, c.train.steps, step)
  progress.write(f"gptjax: {n_params:,} params, mesh {dict(mesh.shape)}, "
                 f"{train_data.num_examples:,} train examples, workdir {workdir}")

  if draw is not None:
    progress.write(f"draw: image tokenizer {'trained, saved' if draw.trained else 'loaded'} "
                   f"({os.path.join(logdir, draw_data.CODES_DIR)}), {draw.layout.codebook_size} "
                   f"codes" + (f"; train reconstruction {_fmt(draw.reconstruction)}"
                               if draw.reconstruction else ""))

  sources = {}  # split -> source: opened once, not at every eval

  def evaluate(split: str, draw_png: Optional[str] = None) -> tuple[dict, list]:
    if split not in sources:
      sources[split] = load_split(c, split)
    model = hooks.eval_model(nnx.merge(graphdef, state.params, rest))
    return ev.evaluate(model, c, split, mesh=mesh, source=sources[split],
                       image_codes=draw.model if draw is not None else None,
                       draw_png=draw_png if jax.process_index() == 0 else None)

  # Hosts agree on a stop at log steps only: an all-gather every step would make each host
  # wait for the slowest every step (no running ahead of the device). A stop then comes at
  # most log_every steps after the signal, well inside a preemption notice.
  watcher = PreemptionWatcher(sync_every=c.train.log_every)
  summary: dict = {"preempted": False}
  throughput = Throughput(mcfg, c.logging)
  last_log_time, last_log_step = time.perf_counter(), step
  last_saved = ckpt.latest_step()
  guard = NonFiniteGuard(c, os.path.join(workdir, "checkpoints"))

  def save(step_: int, force: bool = False) -> None:
    guard.check(step_, ckpt.latest_step)  # never save a diverged run (a scalar fetch)
    ckpt.save(step_, state, train_data.iterator, force=force)

  try:
    while step < c.train.steps:
      local = first_batch if first_batch is not None else next(train_data)
      first_batch = None
      batch = global_batch(local, train_shardings)
      if throughput.flops_per_step is None:
        b_, t_ = batch["inputs"].shape
        throughput.set_step(b_ * t_, flops_per_step(mcfg, b_, t_))
      state, metrics = train_step(state, batch, *step_args)
      step += 1
      guard.observe(step, metrics)  # async, on device
      if step % c.train.log_every == 0 or step == c.train.steps:
        fetched, g = jax.device_get((metrics, guard.counters))  # the only host sync
        m = {k: float(v) for k, v in fetched.items()}
        now = time.perf_counter()
        dt = (now - last_log_time) / max(step - last_log_step, 1)
        m.update(lr=float(lr_at(step - 1)), step_time_s=dt, **throughput.rates(dt))
        # After the rates: the one-off peak measurement (inside the first rates()) stays
        # out of the next interval.
        last_log_time, last_log_step = time.perf_counter(), step
        logger.write(step, "train", m)
        summary["train_loss"] = m["loss"]
        summary["tokens_per_s"] = m["tokens_per_s"]
        progress.update_to(step, throughput.postfix(m))
        guard.check(step, ckpt.latest_step, g)
      every = eval_every(c)
      if every and step % every == 0 and step < c.train.steps:
        out, _ = evaluate(c.data.eval_split)
        logger.write(step, "eval", out)
        progress.write(f"step {step}: eval " + _fmt(out))
        last_log_time = time.perf_counter()  # keep eval time out of the step-time figure
      if ckpt.should_save(step):
        save(step)
        last_saved = step
      if watcher.should_stop(step):
        save(step, force=True)
        ckpt.wait()
        progress.write(f"preempted (SIGTERM): saved step {step}, exiting")
        summary.update(preempted=True, step=step)
        return summary
    guard.check(step, ckpt.latest_step)
    if last_saved != step:
      save(step, force=True)
    ckpt.wait()
    summary.update(step=step, skipped_steps=guard.total)
    final = {}  # split -> (metrics, samples): a run whose eval split is its test split
    for split, key in ((c.data.eval_split, "eval"), (c.data.test_split, "test")):
      if not split or not c.eval.at_end:
        continue
      png = os.path.join(logdir, f"drawings_{key}.png")
      if split in final:  # evaluates it once (the same numbers, the same drawings)
        (out, samples), first_png = final[split]
        if os.path.exists(first_png) and jax.process_index() == 0:
          shutil.copyfile(first_png, png)
      else:
        try:
          out, samples = evaluate(split, draw_png=png)
        except ValueError as e:  # e.g. text_files has no test split
          progress.write(f"skipping {key} on split {split!r}: {e}")
          continue
        final[split] = (out, samples), png
      logger.write(step, key, out)
      summary[key] = out
      progress.write(f"final {key} ({split}): " + _fmt(out))
      if key == "eval" and c.data.task == "lm" and c.eval.samples_to_print > 0 \
          and jax.process_count() == 1:
        model = hooks.eval_model(nnx.merge(graphdef, state.params, rest))
        for text in ev.text_samples(model, c, split, source=sources[split],
                                    n=min(c.eval.samples_to_print, 3)):
          progress.write(f"  sample: {text!r}")
      if key == "test" and samples:
        for s in samples[: c.eval.samples_to_print]:
          progress.write(f"  {s.prompt!r:42} -> {s.prediction!r}   (truth {s.truth!r})")
        png = ev.save_samples_png(samples, os.path.join(logdir, "samples.png"))
        if png:
          progress.write(f"samples: {png}")
    if c.logging.plot:
      png = plot_losses(logdir)
      if png:
        progress.write(f"loss curves: {png}")
    return summary
  finally:
    watcher.close()
    progress.close()
    logger.close()
    ckpt.close()


def _resume(c, ckpt: Checkpointer, abstract, iterator):
  """The restored train state: ``checkpoint.step`` if set, else the latest step (or, with
  ``checkpoint.fallback``, the newest readable one). Steps newer than the one resumed from
  are moved aside (``<step>.superseded``), since training on from there writes those step
  numbers again and a later rerun must resume from the new ones."""
  step = c.checkpoint.step
  if step is None and c.checkpoint.get("fallback", False):
    skipped, errors = [], []
    for candidate in reversed(ckpt.all_steps()):
      try:
        state = restore_train_state(ckpt, abstract, iterator, step=candidate)
        break
      except CheckpointCorruptError as e:
        log.warning("checkpoint.fallback: step %d is unreadable: %s", candidate, e)
        skipped.append(candidate)
        errors.append(e)
    else:  # none reads: the newest one's error (its message says what else to do)
      raise errors[0]
    if skipped:
      log.warning("checkpoint.fallback: skipped unreadable step(s) %s, resumed from step %d",
                  skipped, int(state.step))
  else:
    state = restore_train_state(ckpt, abstract, iterator, step=step)
  newer = [s for s in ckpt.all_steps() if s > int(state.step)]
  if newer:
    ckpt.set_aside(newer, "superseded")
  return state


def _fmt(d: dict) -> str:
  return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
