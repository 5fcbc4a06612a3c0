"""Distillation vs the same student trained from scratch, by the size of the training set.

Run: python benchmarks/distill_vs_scratch.py [--transfer 32,128,1024 --steps 400
                                              --workdir runs/distill_vs_scratch]

A teacher (width 64) trains on 1024 ``shapes`` records (16 px, word tokenizer). Then, for
each transfer-set size n, one student config (width 32, 31,480 params: 4.1x fewer) trains twice
on the first n of those records for the same steps, seed and batches: once on the labels
alone, once distilled from the frozen teacher (alpha 0.7, T 2). Both evaluate on the same
64-record test split every 50 steps. Writes a Markdown table and a PNG of the test-loss
curves. tests/test_distill.py runs the n = 128 row and asserts what it shows.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import ml_collections

TEACHER_RECORDS = 1024
TEST_RECORDS = 64


def run_config(data_dir: str, *, width: int, mlp_dim: int, steps: int, train_size: int,
               eval_every: int = 50, progress: bool = False) -> ml_collections.ConfigDict:
  """The training config of every run here: a small CNN-VLM (depth 2, 4 heads) at a constant lr 3e-3, batch 16 packed rows, evaluated on the whole test split.

  The shapes splits are a pure function of (seed, split, index), so the first
  ``train_size`` training records and the test split are the same records in every run.
  """
  from gptjax.runs import base_config
  from gptjax.train.config import model_section, shapes_kwargs, vision_section
  c = base_config()
  c.model = model_section(
      "tiny", max_seq_len=48, width=width, num_heads=4, num_kv_heads=None,
      mlp_dim=mlp_dim, vocab_size=304,
      vision=vision_section(kind="cnn", image_size=16, cnn_channels=(8, 8), width=16))
  c.data.data_dir = data_dir
  c.data.tokenizer = "shapes"
  c.data.prompt_len, c.data.target_len = 12, 16
  c.data.pack, c.data.packed_len = True, 48
  c.data.builder_kwargs = shapes_kwargs(image_size=16, train_size=train_size,
                                        validation_size=32, test_size=TEST_RECORDS, seed=0)
  c.data.eval_split = "test"  # the curve the comparison is about; there is no model selection
  c.optim.lr, c.optim.warmup_steps, c.optim.end_lr_ratio = 3e-3, 0, 1.0
  c.optim.weight_decay, c.optim.eps = 0.0, 1e-5
  c.train.steps, c.train.batch_size, c.train.log_every = steps, 16, 50
  c.checkpoint.every = 10_000
  c.eval.every, c.eval.batch_size, c.eval.max_batches = eval_every, 64, 100
  c.eval.decode_examples = 0
  c.logging.progress = progress
  c.logging.tensorboard = c.logging.plot = False
  return c


def loss_curve(workdir: str) -> dict[int, float]:
  """Test loss by step: every periodic eval plus the final one."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] in ("eval", "test")}


def train_teacher(workdir: str, *, steps: int = 400, progress: bool = False):
  """(teacher model, its final test loss); data prepared under ``workdir``/data."""
  from gptjax.runs import load_model
  from gptjax.runs import train as run
  c = run_config(os.path.join(workdir, "data"), width=64, mlp_dim=256, steps=steps,
                 train_size=TEACHER_RECORDS, eval_every=0, progress=progress)
  out = run(c, os.path.join(workdir, "teacher"))
  return load_model(os.path.join(workdir, "teacher")), out["test"]["loss"]


def compare(workdir: str, teacher, *, transfer: int, steps: int = 400, alpha: float = 0.7,
            temperature: float = 2.0, progress: bool = False) -> dict:
  """Train the student from scratch and distilled on the first ``transfer`` records;
  returns both test-loss curves ({step: loss}, the last entry the final loss)."""
  from gptjax.compress.distill import distill
  from gptjax.runs import train as run
  c = run_config(os.path.join(workdir, "data"), width=32, mlp_dim=64, steps=steps,
                 train_size=transfer, progress=progress)
  scratch_dir = os.path.join(workdir, f"scratch_{transfer}")
  kd_dir = os.path.join(workdir, f"distilled_{transfer}")
  run(c, scratch_dir)
  distill(c, kd_dir, teacher, alpha=alpha, temperature=temperature)
  return dict(transfer=transfer, scratch=loss_curve(scratch_dir), distilled=loss_curve(kd_dir))


def _markdown(rows: list[dict], teacher_loss: float, steps: int) -> str:
  lines = [f"teacher (width 64, {TEACHER_RECORDS} records): test loss {teacher_loss:.3f}", "",
           "| student trains on | scratch: final | scratch: best (step) "
           "| distilled: final | distilled: best (step) | final: distilled / scratch |",
           "|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    s, d = r["scratch"], r["distilled"]
    sb, db = min(s, key=s.get), min(d, key=d.get)
    lines.append(f"| {r['transfer']} records, {steps} steps | {s[steps]:.3f} | "
                 f"{s[sb]:.3f} ({sb}) | {d[steps]:.3f} | {d[db]:.3f} ({db}) | "
                 f"{d[steps] / s[steps]:.2f} |")
  return "\n".join(lines)


def _plot(rows: list[dict], teacher_loss: float, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), sharey=True,
                           squeeze=False)
  for ax, r in zip(axes[0], rows):
    for name, style in (("scratch", "o-"), ("distilled", "s-")):
      steps, losses = zip(*sorted(r[name].items()))
      ax.plot(steps, losses, style, label=name, markersize=3)
    ax.axhline(teacher_loss, color="gray", linestyle=":", label="teacher")
    ax.set_title(f"student on {r['transfer']} records")
    ax.set_xlabel("step")
    ax.set_yscale("log")
  axes[0][0].set_ylabel("test loss")
  axes[0][0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--transfer", default="32,128,1024",
                  help="comma-separated numbers of training records for the student")
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--teacher-steps", type=int, default=400)
  ap.add_argument("--workdir", default="runs/distill_vs_scratch")
  ap.add_argument("--json", default="", help="also write the results here (tests read it)")
  ap.add_argument("--no-progress", dest="progress", action="store_false")
  args = ap.parse_args()
  sizes = [int(x) for x in args.transfer.split(",")]
  if any(not 0 < n <= TEACHER_RECORDS for n in sizes):
    ap.error(f"--transfer sizes must be in 1..{TEACHER_RECORDS} (the teacher's records), "
             f"got {sizes}")
  if args.steps % 50:
    ap.error(f"--steps must be a multiple of 50 (the eval interval), got {args.steps}")
  t0 = time.perf_counter()
  teacher, teacher_loss = train_teacher(args.workdir, steps=args.teacher_steps,
                                        progress=args.progress)
  rows = []
  for n in sizes:
    rows.append(compare(args.workdir, teacher, transfer=n, steps=args.steps,
                        progress=args.progress))
    print(f"{n} records: scratch {rows[-1]['scratch'][args.steps]:.3f}, "
          f"distilled {rows[-1]['distilled'][args.steps]:.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(teacher=teacher_loss, rows=rows), f)
  table = _markdown(rows, teacher_loss, args.steps)
  png = os.path.join(args.workdir, "distill_vs_scratch.png")
  _plot(rows, teacher_loss, png)
  print(table)
  print(f"plot: {png}\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
