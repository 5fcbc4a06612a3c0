"""The train step's matmuls alone: XLA's dot vs PyTorch's on this CPU, at the shapes and
operand layouts of each train_speed shape's step.

  python benchmarks/matmul_kernels.py [--quick]

Why: train_speed compares whole steps; this splits out how much of the difference is the
matrix-multiply kernels themselves (XLA:CPU's YNNPACK / Eigen dots vs PyTorch's oneDNN /
MKL sgemm), which no change to the model or the step can move. For every weight matmul of a
step (per layer: q, k, v, o projections, MLP up and down; the tied head) the forward
product (NN), the input gradient (NT: dy @ W^T) and the weight gradient (TN: x^T @ dy) are
timed with each operand stored as the step stores it (a transposed operand is a view for
PyTorch, a contracting dimension for XLA), both sides interleaved, median of the repeats;
each XLA product is one jitted call, whose few microseconds of dispatch overlap the previous
call's compute (asynchronous dispatch).
"Step matmuls" sums count x FLOPs / rate over the step's weight matmuls at each side's
rate: the matmul time one step needs with that library's kernels (attention's own T x T
products and everything elementwise excluded).
"""
from __future__ import annotations

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

TIME_PER_CALL_S = 0.1  # each timed chunk repeats a matmul for about this long


def step_matmuls(s: dict) -> list[tuple[str, int, int, int, str, int]]:
  """(name, m, k, n, layout, count per step) of a train step's weight matmuls for
  train_speed shape ``s``; layout NN = x @ W, NT = dy @ W^T, TN = x^T @ dy."""
  m, d, f, v, depth = s["batch"] * s["seq"], s["width"], s["mlp"], s["vocab"], s["depth"]
  return [
      ("qkvo fwd", m, d, d, "NN", 4 * depth), ("qkvo dx", m, d, d, "NT", 4 * depth),
      ("qkvo dW", d, m, d, "TN", 4 * depth),
      ("up fwd", m, d, f, "NN", depth), ("up dx", m, f, d, "NT", depth),
      ("up dW", d, m, f, "TN", depth),
      ("down fwd", m, f, d, "NN", depth), ("down dx", m, d, f, "NT", depth),
      ("down dW", f, m, d, "TN", depth),
      ("head fwd", m, d, v, "NN", 1), ("head dx", m, v, d, "NT", 1), ("head dW", v, m, d, "TN", 1),
  ]


def _pair(m: int, k: int, n: int, layout: str, seed: int = 0):
  """(jax call, torch call) of one (m, k) @ (k, n) product with operands stored per
  ``layout``."""
  import jax
  import numpy as np
  import torch
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((k, m) if layout[0] == "T" else (m, k), dtype=np.float32)
  b = rng.standard_normal((n, k) if layout[1] == "T" else (k, n), dtype=np.float32)
  dims = (((0,) if layout[0] == "T" else (1,), (1,) if layout[1] == "T" else (0,)), ((), ()))
  dot = jax.jit(lambda x, y: jax.lax.dot_general(x, y, dims))
  ja, jb = jax.device_put(a), jax.device_put(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  ta, tb = (ta.t() if layout[0] == "T" else ta), (tb.t() if layout[1] == "T" else tb)
  return (lambda: dot(ja, jb)), (lambda: ta @ tb)


def measure(m: int, k: int, n: int, layout: str, repeats: int) -> dict:
  """{"jax": s, "torch": s} median seconds per product, the two sides interleaved."""
  import jax
  jax_call, torch_call = _pair(m, k, n, layout)
  sides = {"jax": (jax_call, jax.block_until_ready), "torch": (torch_call, lambda r: r)}
  first = {}
  for name, (call, sync) in sides.items():
    first[name] = common.call_times(call, sync, 2)[-1]  # compile / first-touch, then one run
  inner = max(1, min(200, int(TIME_PER_CALL_S / max(min(first.values()), 1e-6))))
  times = {name: [] for name in sides}
  for _ in range(repeats):
    for name, (call, sync) in sides.items():
      times[name] += common.call_times(call, sync, 1, inner=inner)
  return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool = False) -> dict:
  import torch

  from benchmarks.train_speed import QUICK_SHAPES, SHAPE_NAMES, SHAPES
  torch.set_num_threads(os.cpu_count() or 1)
  shapes = QUICK_SHAPES if quick else SHAPES
  repeats = 2 if quick else 5
  big = 256 if quick else 2048
  res = {"square": dict(n=big, **measure(big, big, big, "NN", repeats)), "shapes": {}}
  for key, s in shapes.items():
    rows = []
    for name, m, k, n, layout, count in step_matmuls(s):
      t = measure(m, k, n, layout, repeats)
      rows.append(dict(name=name, m=m, k=k, n=n, layout=layout, count=count,
                       flops=2 * m * k * n, seconds=t))
    res["shapes"][key] = dict(label=SHAPE_NAMES[key], rows=rows,
                              step_matmul_s={side: sum(r["count"] * r["seconds"][side]
                                                       for r in rows)
                                             for side in ("jax", "torch")})
    print(f"{key}: step matmuls jax {res['shapes'][key]['step_matmul_s']['jax'] * 1e3:.1f} ms, "
          f"torch {res['shapes'][key]['step_matmul_s']['torch'] * 1e3:.1f} ms", flush=True)
  return res


def _rate(r: dict, side: str) -> float:
  return r["flops"] / r["seconds"][side] / 1e9


def table(res: dict) -> str:
  sq = res["square"]
  fl = 2 * sq["n"] ** 3
  lines = [f"Square {sq['n']}^3 float32: jax {fl / sq['jax'] / 1e9:.1f} GFLOP/s, torch "
           f"{fl / sq['torch'] / 1e9:.1f} GFLOP/s (jax / torch time "
           f"{sq['jax'] / sq['torch']:.2f}).", "",
           "| shape | matmul | m x k x n | layout | per step | jax GFLOP/s | torch GFLOP/s "
           "| jax / torch time |", "|---|---|---|---|---:|---:|---:|---:|"]
  for s in res["shapes"].values():
    for r in s["rows"]:
      lines.append(f"| {s['label']} | {r['name']} | {r['m']} x {r['k']} x {r['n']} | "
                   f"{r['layout']} | {r['count']} | {_rate(r, 'jax'):.1f} | "
                   f"{_rate(r, 'torch'):.1f} | {r['seconds']['jax'] / r['seconds']['torch']:.2f} |")
  lines += ["", "| shape | step matmuls, jax kernels (ms) | with torch kernels (ms) | jax / torch |",
            "|---|---:|---:|---:|"]
  for s in res["shapes"].values():
    j, t = s["step_matmul_s"]["jax"], s["step_matmul_s"]["torch"]
    lines.append(f"| {s['label']} | {j * 1e3:.1f} | {t * 1e3:.1f} | {j / t:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  common.cli(__doc__, run, table)
