"""Metrics out of the loop: JSONL (always), TensorBoard event files (tensorboardX, no
TensorFlow) and a PNG of the loss curves at the end. Process 0 writes; others no-op.

TensorBoard files and the PNGs need the ``train`` extra (tensorboardX, matplotlib). Without
it a run trains, evaluates and writes metrics.jsonl all the same, and says once which extra
adds the rest (``warn_missing_extra``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Mapping, Optional

import jax

from gptjax.flops import peak_matmul_flops

TRAIN_EXTRA = "pip install 'gptjax[train]'"
# What each module of the 'train' extra adds to a run.
_TRAIN_EXTRA_MODULES = {"tensorboardX": "TensorBoard logs", "matplotlib": "PNG plots"}
_warned = False


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def warn_missing_extra() -> None:
  """One warning line per process, the first time a part of the ``train`` extra is found
  missing: which modules, what the run goes without, and the pip command."""
  global _warned
  if _warned:
    return
  _warned = True
  missing = [m for m in _TRAIN_EXTRA_MODULES if not _importable(m)] or ["a plotting module"]
  lost = ", ".join(_TRAIN_EXTRA_MODULES.get(m, "plots") for m in missing)
  logging.getLogger("gptjax").warning(
      "%s not installed: this run writes no %s (training and metrics.jsonl are unaffected); "
      "add them with: %s", ", ".join(missing), lost, TRAIN_EXTRA)


def new_figure(**kwargs):
  """A matplotlib Figure without pyplot: no global backend is selected or changed (a
  notebook keeps its inline backend), and it works headless. Raises ImportError (after the
  one warning) when matplotlib is not installed."""
  try:
    from matplotlib.figure import Figure
  except ImportError:
    warn_missing_extra()
    raise
  return Figure(**kwargs)


def save_image_grid(images, titles: list[str], path: str, *, cell=(3.4, 3.6),
                    fontsize: int = 7) -> Optional[str]:
  """Images in a grid of up to 4 columns, each titled, as a PNG at ``path``; None without
  matplotlib (after the one warning naming the extra). The samples and drawings plots."""
  if not len(images):
    return None
  cols = min(4, len(images))
  rows = math.ceil(len(images) / cols)
  try:
    fig = new_figure(figsize=(cell[0] * cols, cell[1] * rows))
  except ImportError:
    return None
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, img, title in zip(axes.flat, images, titles):
    ax.imshow(img, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize, wrap=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class MetricsLogger:

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # optional extra: JSONL still has everything
          warn_missing_extra()
          self.tb = None

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split,
           **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class Throughput:
  """tokens/s and MFU at a log step, from the wall time per step of the interval (the loop
  times intervals between log steps: no host sync per step).

  MFU = model FLOPs per step (``gptjax.flops.flops_per_step``) / step time / peak, the
  peak being ``logging.peak_flops`` when > 0, else this machine's measured matmul FLOP/s in
  the model's compute dtype (``peak_matmul_flops``, looked up at the first log step: measured
  once per machine and kept on disk). With ``logging.mfu=False`` no peak is measured and no
  mfu is logged.
  """

  def __init__(self, model_cfg, logging_cfg):
    self.dtype = model_cfg.dtype
    self.enabled = bool(logging_cfg.get("mfu", True))
    peak = float(logging_cfg.get("peak_flops", 0.0) or 0.0)
    if peak < 0:
      raise ValueError(f"config.logging.peak_flops={peak} is invalid: must be > 0 (FLOP/s), "
                       "or 0 to measure the peak")
    self.peak = peak or None
    self.tokens_per_step = None
    self.flops_per_step = None

  def set_step(self, tokens: int, flops: float) -> None:
    self.tokens_per_step, self.flops_per_step = int(tokens), float(flops)

  def rates(self, step_time_s: float) -> dict:
    """{'tokens_per_s', 'mfu' (when enabled)} for one step of ``step_time_s``."""
    if step_time_s <= 0 or self.flops_per_step is None:
      return {"tokens_per_s": 0.0, **({"mfu": 0.0} if self.enabled else {})}
    out = {"tokens_per_s": self.tokens_per_step / step_time_s}
    if self.enabled:
      if self.peak is None:
        self.peak = peak_matmul_flops(self.dtype)
      out["mfu"] = self.flops_per_step / step_time_s / self.peak
    return out

  @staticmethod
  def postfix(m: Mapping[str, float]) -> dict:
    """The progress bar's fields."""
    out = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:,.0f}",
           "step": f"{m['step_time_s'] * 1e3:.0f}ms"}
    if "mfu" in m:
      out["mfu"] = f"{100 * m['mfu']:.1f}%"
    return out


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, out: Optional[str] = None) -> Optional[str]:
  """loss_curves.png: train loss (and eval loss / accuracies if logged) against step; None
(after one warning naming the extra) without matplotlib."""
  rows = read_metrics(workdir)
  if not rows or jax.process_index() != 0:
    return None
  try:
    fig = new_figure(figsize=(11, 4))
  except ImportError:
    return None
  ax, ax2 = fig.subplots(1, 2)
  for split, style in (("train", "-"), ("eval", "o-")):
    pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split and "loss" in r
           and math.isfinite(r["loss"])]
    if pts:
      ax.plot(*zip(*pts), style, label=f"{split} loss", markersize=4)
  ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.set_yscale("log")
  ax.grid(alpha=0.3), ax.legend()
  for key in ("caption_exact_match", "vqa_accuracy", "draw_color_and_count",
              "draw_best_color_and_count"):
    pts = [(r["step"], r[key]) for r in rows if r["split"] == "eval" and key in r]
    if pts:
      ax2.plot(*zip(*pts), "o-", label=key, markersize=4)
  ax2.set_xlabel("step"), ax2.set_ylim(-0.02, 1.02), ax2.grid(alpha=0.3)
  if ax2.lines:
    ax2.legend()
  ax2.set_title("eval accuracy")
  fig.tight_layout()
  out = out or os.path.join(workdir, "loss_curves.png")
  fig.savefig(out, dpi=110)
  return out


def setup_cli_logging() -> None:
  """Logging for the command-line entry points: gptjax's own messages at INFO, libraries
  (orbax logs every checkpoint save step by step at INFO through absl) only from WARNING."""
  import logging

  from absl import logging as absl_logging
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("gptjax").setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.WARNING)
