"""Compile time and step time of the jitted train step vs depth: the Python loop over the
layers against ``ModelConfig.scan_layers=True`` (one ``lax.scan``), and the remat policies.

  python benchmarks/compile_depth.py [--quick] [--repeats 5] [--json out.json]

Shape: width 128, 4 heads, F 512, T 64, B 8, byte vocab 260, float32, no dropout, at depth
2 / 12 / 24 (loop and scan, remat 'none'), plus remat 'full' and 'dots' at depth 24 (loop
and scan). The step is built as ``gptjax/train/loop.py`` builds it (``create_train_state``
+ ``make_train_step`` + ``jit_train_step`` on a 1-device mesh, AdamW, clipping) and fed one
fixed batch. Compile time: ``lower(...).compile()`` of the step, lowering excluded (tracing
is Python, and a scan traces one block instead of ``depth``). Step time: the median over
repeats of ``inner`` steps each, the variants timed interleaved (A, B, A, B, ...).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

import jax  # noqa: E402

SHAPE = dict(width=128, heads=4, mlp=512, seq=64, batch=8, vocab=260)
QUICK_SHAPE = dict(width=32, heads=2, mlp=64, seq=16, batch=2, vocab=260)
DEPTHS, QUICK_DEPTHS = (2, 12, 24), (2, 6)


def variants(depths) -> list[tuple[int, bool, str]]:
  """(depth, scan, remat) of every measured step."""
  out = [(d, scan, "none") for d in depths for scan in (False, True)]
  out += [(depths[-1], scan, r) for r in ("full", "dots") for scan in (False, True)]
  return out


def name(depth: int, scan: bool, remat: str) -> str:
  return f"depth {depth}, {'scan' if scan else 'loop'}, remat {remat}"


def build(s: dict, depth: int, scan: bool, remat: str, seed: int = 0):
  """-> (compile seconds, step(), sync()) for one variant."""
  from benchmarks.train_speed import train_config
  from gptjax.config import ModelConfig
  cfg = ModelConfig(vocab_size=s["vocab"], max_seq_len=s["seq"], width=s["width"],
                    depth=depth, num_heads=s["heads"], mlp_dim=s["mlp"], scan_layers=scan,
                    remat=remat)
  step, state, batch = common.fixed_batch_step(cfg, train_config(dict(s, depth=depth)), s, seed)
  lowered = step.lower(state, batch)
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  box = {"state": state, "m": None}

  def run():
    box["state"], box["m"] = compiled(box["state"], batch)

  def sync():
    jax.block_until_ready(box["m"]["loss"])

  return compile_s, run, sync


def run(quick: bool = False, repeats: int = 0) -> dict:
  s, depths = (QUICK_SHAPE, QUICK_DEPTHS) if quick else (SHAPE, DEPTHS)
  repeats = repeats or (2 if quick else 5)
  inner = 2 if quick else 5
  sides, compile_s = {}, {}
  for v in variants(depths):
    compile_s[name(*v)], run_, sync = build(s, *v)
    run_()  # warm-up: the first call also transfers the state
    sync()
    sides[name(*v)] = (run_, sync)
  times = {k: [] for k in sides}
  for _ in range(repeats):
    for k, (run_, sync) in sides.items():
      t = time.perf_counter()
      for _ in range(inner):
        run_()
      sync()
      times[k].append((time.perf_counter() - t) / inner)
  rows = [dict(depth=d, scan=sc, remat=r, compile_s=compile_s[name(d, sc, r)],
               step_s=statistics.median(times[name(d, sc, r)]))
          for d, sc, r in variants(depths)]
  return dict(shape=s, depths=list(depths), repeats=repeats, inner=inner, rows=rows,
              per_step_s=times)


def _row(res: dict, depth: int, scan: bool, remat: str = "none") -> dict:
  return next(r for r in res["rows"] if (r["depth"], r["scan"], r["remat"]) == (depth, scan,
                                                                                  remat))


def targets(res: dict) -> list[tuple[str, bool]]:
  lo, hi = res["depths"][0], res["depths"][-1]
  out = [(f"compile(depth {hi}, scan) <= 1.5 x compile(depth {lo}, scan)",
          _row(res, hi, True)["compile_s"] <= 1.5 * _row(res, lo, True)["compile_s"])]
  for d in res["depths"]:
    out.append((f"step time, depth {d}: scan <= 1.05 x loop",
                _row(res, d, True)["step_s"] <= 1.05 * _row(res, d, False)["step_s"]))
  return out


def table(res: dict) -> str:
  s = res["shape"]
  lines = [f"Width {s['width']}, {s['heads']} heads, F {s['mlp']}, T {s['seq']}, "
           f"B {s['batch']}, float32; median of {res['repeats']} x {res['inner']} steps.", "",
           "| depth | layers | remat | compile (s) | step (ms) | step vs loop |",
           "|---:|---|---|---:|---:|---:|"]
  for r in res["rows"]:
    loop = _row(res, r["depth"], False, r["remat"])["step_s"]
    lines.append(f"| {r['depth']} | {'scan' if r['scan'] else 'loop'} | {r['remat']} | "
                 f"{r['compile_s']:.2f} | {r['step_s'] * 1e3:.2f} | {r['step_s'] / loop:.2f} |")
  lines += common.targets_lines(targets(res))
  return "\n".join(lines)


def main():
  common.cli(__doc__, run, table, quick_help='tiny shape, depths 2 / 6')


if __name__ == "__main__":
  main()
