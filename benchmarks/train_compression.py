"""Compression during training (``config.qat`` / ``config.prune``) vs after it, measured alike.

Run: python benchmarks/train_compression.py [--steps 400 --workdir runs/train_compression]

One small CNN-VLM config (width 64, 16 px ``shapes``, 1024 training records, the config of
benchmarks/distill_vs_scratch.py's teacher) is trained several ways for the same steps, seed
and batches; every result is evaluated by the compression recipe's ``evaluate_stage`` on
the same 64-record test split (test loss, caption exact match, VQA accuracy over all 256
tasks, decode tokens/s) plus the fraction of zero kernel weights:

  float                      plain AdamW
  float -> PTQ int8          post-training int8 weights + calibrated int8 activations
  QAT int8 (fake quant)      trained with config.qat.enabled, evaluated as trained
  QAT -> int8                that run converted to real int8 (quantize.convert_qat_to_int8)
  PTQ / QAT int4 weights     the same for per-channel int4 weights (activations float)
  gradual global 50 % / 75 % config.prune (cubic schedule to 3/4 of the steps)
  gradual 2:4                config.prune.method='n_m'
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from distill_vs_scratch import TEACHER_RECORDS, run_config


def _kernel_sparsity(model) -> float:
  from flax import nnx

  from gptjax.compress import prune
  return prune.sparsity_report(nnx.state(model, nnx.Param))["global"]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--workdir", default="runs/train_compression")
  args = ap.parse_args()
  if args.steps < 4:
    ap.error(f"--steps must be >= 4, got {args.steps}")

  from gptjax.compress import quantize
  from gptjax.compress.recipe import calibration_batches, evaluate_stage
  from gptjax.runs import load_model
  from gptjax.runs import train as run

  t0 = time.perf_counter()
  data = os.path.join(args.workdir, "data")

  def config(**changes):
    c = run_config(data, width=64, mlp_dim=256, steps=args.steps, train_size=TEACHER_RECORDS,
                   eval_every=0, progress=True)
    c.eval.at_end = False  # every model is evaluated below, the same way
    for key, value in changes.items():
      section, name = key.split("__")
      c[section][name] = value
    return c

  def train(name: str, c):
    run(c, os.path.join(args.workdir, name))
    return load_model(os.path.join(args.workdir, name))

  base = config()
  measure = dict(decode_examples=4 * 64, speed_batch=8, speed_new_tokens=16)
  rows = []

  def add(name, model, note=""):
    r = evaluate_stage(name, model, base, 0, note, **measure)
    rows.append((r, _kernel_sparsity(model)))
    print(f"{name}: {r}", flush=True)

  float_model = train("float", base)
  add("float", float_model, "AdamW")
  add("float -> PTQ int8", quantize.ptq_int8(float_model, calibration_batches(base, 4)),
      "int8 w + calibrated int8 a")
  qat = train("qat", config(qat__enabled=True))
  add("QAT int8 (fake quant)", qat, "config.qat.enabled")
  add("QAT -> int8", quantize.convert_qat_to_int8(qat), "convert_qat_to_int8")
  # int4 weights, per channel, activations float: where training for the rounding matters.
  add("float -> PTQ int4 weights", quantize.int4_weight_only(float_model, group_size=None),
      "per-channel int4 w, float a")
  qat4 = train("qat_int4", config(qat__enabled=True, qat__weight_qtype="int4",
                                  qat__act_qtype=None))
  add("QAT int4 weights (fake quant)", qat4, "qat.weight_qtype=int4, act_qtype=None")
  add("QAT int4 -> int4", quantize.convert_qat_to_int8(qat4), "convert_qat_to_int8 (its rules)")
  for name, changes in (
      ("gradual global 50%", dict(prune__final_sparsity=0.5)),
      ("gradual global 75%", dict(prune__final_sparsity=0.75)),
      ("gradual 2:4", dict(prune__method="n_m"))):
    model = train(name.replace(" ", "_").replace(":", "of").replace("%", ""),
                  config(prune__enabled=True, prune__frequency=10, **changes))
    add(name, model, "config.prune")

  lines = ["| model | test loss | caption EM | VQA acc | zero kernel weights | decode tok/s | how |",
           "|---|---:|---:|---:|---:|---:|---|"]
  for r, sparsity in rows:
    lines.append(f"| {r.stage} | {r.eval_loss:.3f} | {r.caption_exact_match:.3f} | "
                 f"{r.vqa_accuracy:.3f} | {sparsity:.1%} | {r.decode_tokens_per_s:,.0f} | "
                 f"{r.note} |")
  print("\n".join(lines))
  print(f"wall time {time.perf_counter() - t0:.0f} s ({args.steps} steps per run, "
        f"{np.round(rows[0][0].params / 1e3):.0f}k params)")


if __name__ == "__main__":
  main()
