"""Train-step time: gptjax's jitted ``train_step`` vs the same GPT in PyTorch (eager and
``torch.compile``), and the whole 2,000-step run through ``train.py`` vs the PyTorch script.

  python benchmarks/train_speed.py [--quick] [--repeats 7]

Shapes: (a) 4 layers x 128 wide, 4 heads, T 64, B 12, byte vocab 260; (b) the ``mini``
preset (2 x 128, 4 heads, F 512) at T 256, B 8; (c) GPT-2-small width (768, 12 heads) with
2 layers, T 256, B 8, vocab 50,304. All float32, GELU(tanh), LayerNorm, tied head, AdamW
(decay on matrices), clipping at 1.0, no dropout. gptjax's step is built as
``gptjax/train/loop.py`` builds it (``make_train_step`` + ``jit_train_step`` on a 1-device
mesh, the state donated) and fed one fixed batch (no input pipeline); PyTorch steps the
same batch. Each repeat times ``inner`` steps of each side in turn (A, B, C, A, B, C, ...)
after warm-up; the table shows medians per step, the ratio to PyTorch eager and MFU
(``gptjax.flops``: model FLOPs per step / step time / the measured matmul peak).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

import jax  # noqa: E402

SHAPES = {
    "a": dict(depth=4, width=128, heads=4, mlp=512, seq=64, batch=12, vocab=260),
    "b": dict(depth=2, width=128, heads=4, mlp=512, seq=256, batch=8, vocab=260),
    "c": dict(depth=2, width=768, heads=12, mlp=3072, seq=256, batch=8, vocab=50304),
}
QUICK_SHAPES = {"quick": dict(depth=1, width=32, heads=2, mlp=64, seq=16, batch=2, vocab=260)}
SHAPE_NAMES = {"a": "(a) 4x128, T 64, B 12", "b": "(b) mini, T 256, B 8",
               "c": "(c) GPT-2 width, 2 layers, T 256, B 8", "quick": "quick 1x32, T 16, B 2"}
OPTIM = dict(lr=1e-3, weight_decay=0.1, clip=1.0)
SHERLOCK = os.path.join(ROOT, "..", "shared", "data", "sherlock.txt")


def model_config(s: dict):
  from gptjax.config import ModelConfig
  return ModelConfig(vocab_size=s["vocab"], max_seq_len=s["seq"], width=s["width"],
                     depth=s["depth"], num_heads=s["heads"], mlp_dim=s["mlp"])


def train_config(s: dict, steps: int = 1000):
  """The training config of these runs (also what the whole-run train.py gets)."""
  from gptjax.runs import base_config
  from gptjax.train.config import model_section
  c = base_config()
  c.model = model_section("mini", vocab_size=s["vocab"], max_seq_len=s["seq"],
                          width=s["width"], depth=s["depth"], num_heads=s["heads"],
                          num_kv_heads=None, mlp_dim=s["mlp"], position="learned", dropout=0.0)
  c.optim.update(lr=OPTIM["lr"], warmup_steps=100, end_lr_ratio=0.1,
                 weight_decay=OPTIM["weight_decay"], clip_norm=OPTIM["clip"])
  c.train.steps, c.train.batch_size = steps, s["batch"]
  return c


def gptjax_stepper(s: dict, seed: int = 0):
  """() -> run one step on a fixed batch; returns (step_fn, sync_fn)."""
  step, state, batch = common.fixed_batch_step(model_config(s), train_config(s), s, seed)
  box = {"state": state, "m": None}

  def run():
    box["state"], box["m"] = step(box["state"], batch)

  def sync():
    jax.block_until_ready(box["m"]["loss"])

  return run, sync


def torch_stepper(s: dict, compile: bool, seed: int = 0):
  import torch

  from benchmarks.torch_gpt import GPT, adamw, make_train_step
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(seed)
  model = GPT(s["vocab"], s["seq"], s["width"], s["depth"], s["heads"], s["mlp"])
  opt = adamw(model, OPTIM["lr"], OPTIM["weight_decay"])
  step = make_train_step(model, opt, OPTIM["clip"], compile=compile)
  g = torch.Generator().manual_seed(seed)
  toks = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=g)
  x, y = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
  box = {"loss": None}

  def run():
    box["loss"] = step(x, y)

  def sync():
    float(box["loss"].detach())

  return run, sync


def time_interleaved(sides: dict, *, repeats: int, inner: int, warmup: int = 3) -> dict:
  """{name: [seconds per step, one per repeat]}: each repeat times ``inner`` steps of every
  side in turn (after ``warmup`` untimed steps each, which include compilation)."""
  first = {}
  for name, (run, sync) in sides.items():
    t = time.perf_counter()
    run()
    sync()
    first[name] = time.perf_counter() - t  # the first call: tracing + compilation
    for _ in range(warmup - 1):
      run()
    sync()
  times = {name: [] for name in sides}
  for _ in range(repeats):
    for name, (run, sync) in sides.items():
      common.settle()
      t = time.perf_counter()
      for _ in range(inner):
        run()
      sync()
      times[name].append((time.perf_counter() - t) / inner)
  return {"per_step_s": times, "first_call_s": first}


def torch_compile_works() -> tuple[bool, str]:
  try:
    import torch
    f = torch.compile(lambda a: (a * 2).sum())
    f(torch.ones(4))
    return True, ""
  except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
    return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def step_speed(shapes: dict, repeats: int, peak: float, torch_compile: bool = True) -> dict:
  from gptjax.flops import flops_per_step
  ok, why = torch_compile_works() if torch_compile else (False, "skipped (--quick: inductor "
                                                        "compiles for minutes)")
  out = {}
  for key, s in shapes.items():
    flops = flops_per_step(model_config(s), s["batch"], s["seq"])
    inner = max(1, int(round(0.5 / max(flops / peak, 1e-4))))  # ~0.5 s per timing at peak
    inner = min(inner, 20)
    sides = {"gptjax": gptjax_stepper(s), "torch eager": torch_stepper(s, compile=False)}
    if ok:
      sides["torch.compile"] = torch_stepper(s, compile=True)
    t = time_interleaved(sides, repeats=repeats, inner=inner)
    med = {k: statistics.median(v) for k, v in t["per_step_s"].items()}
    out[key] = dict(shape=s, flops_per_step=flops, inner_steps=inner, repeats=repeats,
                    median_s=med, first_call_s=t["first_call_s"], per_step_s=t["per_step_s"],
                    mfu={k: flops / v / peak for k, v in med.items()},
                    compile_error=None if ok else why)
  return out


def run_whole(steps: int = 2000, s: dict = SHAPES["a"]) -> dict:
  """train.py (subprocess, data already prepared) vs ``python benchmarks/torch_gpt.py``,
  same shape / steps / optimizer on sherlock.txt bytes; wall clock of each command."""
  from gptjax.train.data import load_split
  work = tempfile.mkdtemp(prefix="train_speed_")
  cfg_path = os.path.join(work, "config.py")
  with open(cfg_path, "w") as f:
    f.write(f"""import sys
sys.path.insert(0, {ROOT!r})
from benchmarks.train_speed import whole_run_config


def get_config():
  return whole_run_config({work!r}, {steps})
""")
  c = whole_run_config(work, steps)
  load_split(c, c.data.train_split)  # prepare the data once, outside the timing
  env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=ROOT)
  cmds = {"gptjax train.py": [sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg_path,
                              "--workdir", os.path.join(work, "run")],
          "torch script": [sys.executable, os.path.join(ROOT, "benchmarks", "torch_gpt.py"),
                           "--text", SHERLOCK, "--steps", str(steps), "--seq", str(s["seq"]),
                           "--batch", str(s["batch"]), "--depth", str(s["depth"]),
                           "--width", str(s["width"]), "--heads", str(s["heads"])]}
  out = {}
  for name, cmd in cmds.items():
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out[name] = dict(wall_s=time.perf_counter() - t, rc=p.returncode,
                     tail=(p.stdout + p.stderr)[-400:] if p.returncode else "")
  return out


def whole_run_config(work: str, steps: int):
  s = SHAPES["a"]
  c = train_config(s, steps)
  c.data.name, c.data.task, c.data.tokenizer = "text_files", "lm", "byte"
  c.data.paths, c.data.seq_len = (SHERLOCK,), s["seq"]
  c.data.data_dir = os.path.join(work, "data")
  c.data.test_split = ""
  c.mesh.data = 1
  c.train.log_every = 100
  c.checkpoint.every = steps
  c.eval.every, c.eval.at_end = 0, False
  c.logging.tensorboard = c.logging.plot = c.logging.progress = False
  return c


def run(quick: bool = False, repeats: int = 0, whole_run: bool = True) -> dict:
  from gptjax.flops import peak_matmul_flops
  peak = peak_matmul_flops("float32", n=1024 if quick else 2048, repeats=3 if quick else 5)
  shapes = QUICK_SHAPES if quick else SHAPES
  res = dict(peak_flops=peak, steps=step_speed(shapes, repeats or (2 if quick else 7), peak,
                                               torch_compile=not quick))
  if whole_run and not quick:
    res["whole_run"] = run_whole()
  return res


def targets(res: dict) -> list[tuple[str, bool]]:
  out = []
  for key in ("a", "b"):
    r = res["steps"].get(key)
    if r is None:
      continue
    m = r["median_s"]
    out.append((f"{key}: gptjax <= 0.8 x torch eager", m["gptjax"] <= 0.8 * m["torch eager"]))
    if "torch.compile" in m:
      out.append((f"{key}: gptjax <= 1.0 x torch.compile", m["gptjax"] <= m["torch.compile"]))
  if "c" in res["steps"]:
    out.append(("c: gptjax MFU >= 80 % of the matmul peak", res["steps"]["c"]["mfu"]["gptjax"] >= 0.8))
  w = res.get("whole_run")
  if w:
    out.append(("whole run (a): train.py <= 0.8 x torch script",
                w["gptjax train.py"]["wall_s"] <= 0.8 * w["torch script"]["wall_s"]))
  return out


def table(res: dict) -> str:
  lines = [f"Matmul peak (float32, jitted jnp.dot): {res['peak_flops'] / 1e9:.1f} GFLOP/s.", "",
           "| shape | side | median step (ms) | vs torch eager | MFU | first call (s) |",
           "|---|---|---:|---:|---:|---:|"]
  for key, r in res["steps"].items():
    eager = r["median_s"]["torch eager"]
    for side, v in r["median_s"].items():
      lines.append(f"| {SHAPE_NAMES[key]} | {side} | {v * 1e3:.2f} | {v / eager:.2f} | "
                   f"{100 * r['mfu'][side]:.1f} % | {r['first_call_s'][side]:.2f} |")
    if r.get("compile_error"):
      lines.append(f"| {SHAPE_NAMES[key]} | torch.compile | not run: {r['compile_error']} | | | |")
  w = res.get("whole_run")
  if w:
    lines += ["", "Whole run, shape (a), 2,000 steps on sherlock.txt bytes (wall clock of the "
              "command: start-up, compile, training, final checkpoint):", "",
              "| command | wall (s) | exit |", "|---|---:|---:|"]
    for name, r in w.items():
      lines.append(f"| {name} | {r['wall_s']:.1f} | {r['rc']} |")
  t = targets(res)
  if not t:
    return "\n".join(lines + ["", "(No targets at the --quick shape.)"])
  lines += common.targets_lines(t)
  return "\n".join(lines)


def main():
  import argparse
  import json
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--repeats", type=int, default=0)
  ap.add_argument("--only", nargs="*", default=None, help="shape keys, e.g. a c")
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  if a.only:
    from gptjax.flops import peak_matmul_flops
    peak = peak_matmul_flops("float32")
    res = dict(peak_flops=peak, steps=step_speed({k: SHAPES[k] for k in a.only},
                                                 a.repeats or 7, peak))
  else:
    res = run(a.quick, a.repeats)
  print(table(res))
  if a.json:
    json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
  main()
