"""``run(config, workdir)``: the whole training job — data, sharded state, the jitted step,
checkpoints (resume / preemption), periodic eval, logs and plots."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx

from gptjax import sharding as shd
from gptjax.batch import MODEL_KEYS, batch_shardings, global_batch
from gptjax.train import evaluate as ev
from gptjax.train.checkpoint import Checkpointer
from gptjax.train.config import eval_every, validate
from gptjax.train.data import load_split, pipeline_for
from gptjax.train.hooks import RunHooks
from gptjax.train.load import save_run_config
from gptjax.train.metrics import MetricsLogger, plot_losses
from gptjax.train.optim import make_optimizer, schedule
from gptjax.train.preemption import PreemptionWatcher
from gptjax.train.state import abstract_train_state, create_train_state
from gptjax.train.step import jit_train_step, make_train_step

log = logging.getLogger("gptjax")


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
  os.makedirs(logdir, exist_ok=True)
  return workdir, logdir


def run(c, workdir: str, hooks: Optional[RunHooks] = None) -> dict:
  """Train to ``c.train.steps`` (resuming from ``workdir`` if it has a checkpoint).

  ``hooks`` change what is trained (``RunHooks``); compression switched on in the config
  (``config.qat`` / ``config.prune``) reaches here only through them — ``gptjax.runs.train``
  composes those from the config.

  Returns a summary dict: final step, last train loss, final eval/test metrics,
  ``preempted`` (True if SIGTERM stopped the run after saving).
  """
  shd.maybe_initialize_distributed()
  mcfg = validate(c)
  workdir, logdir = resolve_dirs(workdir)
  save_run_config(c, logdir)
  mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  shardings = batch_shardings(mesh)
  if c.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"config.train.batch_size={c.train.batch_size} must divide by the "
                     f"data*fsdp mesh size {mesh.shape['data'] * mesh.shape['fsdp']}")

  train_src = load_split(c, c.data.train_split)
  train_data = pipeline_for(c, train_src, train=True, batch_size=c.train.batch_size)
  hooks = hooks or RunHooks()
  tx = make_optimizer(c)
  if hooks.wrap_tx is not None:
    tx = hooks.wrap_tx(tx)
  graphdef, rest, state, state_sh = create_train_state(
      mcfg, tx, mesh, c.seed, model_fn=hooks.model_fn, init_params=hooks.init_params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.every,
                      keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(abstract_train_state(state, state_sh), train_data.iterator,
                         step=c.checkpoint.step)
    log.info("resumed from step %d in %s", int(state.step), workdir)

  # The step's input shardings must mirror the batch exactly: text-only (lm) batches have
  # no image, padded/packed ones carry segment ids; take the keys from the first batch.
  first_batch = next(train_data)
  train_shardings = {k: shardings[k] for k in MODEL_KEYS if k in first_batch}
  train_step = jit_train_step(
      make_train_step(graphdef, rest, tx, accum_steps=c.optim.accum_steps, loss_fn=hooks.loss_fn),
      state_sh, train_shardings, mesh, aux_shardings=hooks.aux_shardings)
  step_args = () if hooks.aux_shardings is None else (hooks.aux,)
  lr_at = schedule(c)
  logger = MetricsLogger(logdir, tensorboard=c.logging.tensorboard)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = int(state.step)
  progress = _Progress(c.logging.progress, c.train.steps, step)
  progress.write(f"gptjax: {n_params:,} params, mesh {dict(mesh.shape)}, "
                 f"{train_data.num_examples:,} train examples, workdir {workdir}")

  sources = {}  # split -> source: opened once, not at every eval

  def evaluate(split: str) -> tuple[dict, list]:
    if split not in sources:
      sources[split] = load_split(c, split)
    model = hooks.eval_model(nnx.merge(graphdef, state.params, rest))
    return ev.evaluate(model, c, split, mesh=mesh, source=sources[split])

  watcher = PreemptionWatcher()
  summary: dict = {"preempted": False}
  tokens_per_step = None
  last_log_time, last_log_step = time.perf_counter(), step
  last_saved = ckpt.latest_step()
  try:
    while step < c.train.steps:
      local = first_batch if first_batch is not None else next(train_data)
      first_batch = None
      batch = global_batch(local, train_shardings)
      if tokens_per_step is None:
        tokens_per_step = int(np.prod(batch["inputs"].shape))
      state, metrics = train_step(state, batch, *step_args)
      step += 1
      if step % c.train.log_every == 0 or step == c.train.steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only host sync
        now = time.perf_counter()
        dt = (now - last_log_time) / max(step - last_log_step, 1)
        last_log_time, last_log_step = now, step
        m.update(lr=float(lr_at(step - 1)), step_time_s=dt,
                 tokens_per_s=tokens_per_step / dt if dt > 0 else 0.0)
        logger.write(step, "train", m)
        summary["train_loss"] = m["loss"]
        summary["tokens_per_s"] = m["tokens_per_s"]
        progress.update_to(step, {
            "loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:,.0f}",
            "step": f"{dt * 1e3:.0f}ms"})
      every = eval_every(c)
      if every and step % every == 0 and step < c.train.steps:
        out, _ = evaluate(c.data.eval_split)
        logger.write(step, "eval", out)
        progress.write(f"step {step}: eval " + _fmt(out))
        last_log_time = time.perf_counter()  # keep eval time out of the step-time figure
      if ckpt.should_save(step):
        ckpt.save(step, state, train_data.iterator)
        last_saved = step
      if watcher.should_stop(step):
        ckpt.save(step, state, train_data.iterator, force=True)
        ckpt.wait()
        progress.write(f"preempted (SIGTERM): saved step {step}, exiting")
        summary.update(preempted=True, step=step)
        return summary
    if last_saved != step:
      ckpt.save(step, state, train_data.iterator, force=True)
    ckpt.wait()
    summary["step"] = step
    for split, key in ((c.data.eval_split, "eval"), (c.data.test_split, "test")):
      if not split or not c.eval.at_end:
        continue
      try:
        out, samples = evaluate(split)
      except ValueError as e:  # e.g. text_files has no test split
        progress.write(f"skipping {key} on split {split!r}: {e}")
        continue
      logger.write(step, key, out)
      summary[key] = out
      progress.write(f"final {key} ({split}): " + _fmt(out))
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


def _fmt(d: dict) -> str:
  return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
