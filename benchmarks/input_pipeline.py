"""Input pipeline vs train step: batches/s of the grain pipeline the training loop really uses,
for each task, against the rate of the jitted train step on the same config's model and
batch; and the step's memory from ``compiled.memory_analysis()``.

  python benchmarks/input_pipeline.py [--quick] [--repeats 5] [--json out.json]

Tasks (full mode): ``lm`` on pre-tokenised bytes of sherlock.txt (``data.name='tokens'``,
random windows; ``configs/lm_text``'s mini decoder) at T 64 / B 12 and T 256 / B 32;
``vqa`` packed rows of the built-in ``shapes`` (the ``demo`` config, 2,000 training records);
``draw``: the ``multitask`` config's mix of vqa and draw rows (``gptjax.train.draw_data``)
with an image tokenizer trained for 2 steps (an 8-channel one without residual blocks: its
quality and size do not change the pipeline's work per row). ``--quick``: tiny models, lm
and vqa only.

Per task:
- pipeline: ``next()`` on the loop's iterator (``pipeline_for`` / ``draw_data.pipeline``:
  ``batch_iterator``, a thread per core up to 16, 16 batches prefetched), timed alone in
  fixed-length windows after a warm-up window, median over repeats;
- step: the compiled ``train_step`` (built as ``gptjax/train/loop.py`` builds it, 1-device
  mesh, state donated) on one fixed batch, timed with ``block_until_ready``;
- fed step: the loop's own sequence per step, ``global_batch(next(it))`` then the step, so
  the pipeline's threads and the step share the cores as in training: first while the
  prefetch buffer fills (the start of a run, or a resume), then once it is full;
- ratio = pipeline batches/s / step steps/s (target >= 2: the step never waits), and fed
  step / step (target <= 1.1);
- where the loop's reading misses a target, other readings of the same ``MapDataset``: no
  threads (``ReadOptions(num_threads=0)``), grain's default (16 threads, 500 prefetched:
  what the loop used before) and 2 worker processes (``mp_prefetch``);
- memory: argument / output / alias / temp bytes of the compiled step; "peak per step" =
  argument + output - alias + temp (a donated, aliased output reuses its argument's buffer).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.data.pipeline import PREFETCH_BATCHES  # noqa: E402

SHERLOCK = os.path.join(ROOT, "..", "shared", "data", "sherlock.txt")
FULL = {"lm T64 B12": ("lm", dict(seq=64, batch=12)),
        "lm T256 B32": ("lm", dict(seq=256, batch=32)),
        "vqa (demo)": ("vqa", {}),
        "draw (multitask)": ("draw", {})}
QUICK = {"lm quick T32 B4": ("lm", dict(seq=32, batch=4)),
         "vqa quick": ("vqa", {})}
# vqa / draw data: enough records that an epoch is not one prefetch buffer.
SHAPES_FULL = dict(image_size=32, train_size=2000, validation_size=32, test_size=32, seed=0)
SHAPES_QUICK = dict(image_size=16, train_size=64, validation_size=32, test_size=32, seed=0)
TARGET_RATIO = 2.0
TARGET_FED = 1.1


# --- configs (each a real configs/*.py config, data redirected into a temp dir) -------------

def _small_model(c, image_size: int):
  """--quick: a 1-layer 32-wide decoder (and a 2-conv 16-px encoder) on the config's layout."""
  from gptjax.train.config import model_section, vision_section
  m = {k: v for k, v in c.model.to_dict().items() if k != "vision"}
  m.update(width=32, depth=1, num_heads=2, num_kv_heads=None, mlp_dim=64, head_dim=None,
           num_unique_layers=None)
  vision = None
  if c.model.vision is not None:
    vision = vision_section(**dict(c.model.vision.to_dict(), image_size=image_size,
                                   cnn_channels=(8, 8), width=16))
  c.model = model_section("tiny", **m, vision=vision)


def lm_config(work: str, seq: int, batch: int, quick: bool):
  from gptjax.configs.lm_text import get_config
  from gptjax.data.tokens import pretokenize
  tok_dir = os.path.join(work, "tokens")
  pretokenize([SHERLOCK], tok_dir, "byte", validation_fraction=0.05, progress=False)
  c = get_config()
  c.data.name, c.data.paths, c.data.seq_len = "tokens", (tok_dir,), seq
  c.model.max_seq_len = seq
  c.train.batch_size = batch
  if quick:
    _small_model(c, 0)
  return c


def vqa_config(work: str, quick: bool, name: str = "demo"):
  import importlib

  from gptjax.train.config import shapes_kwargs
  c = importlib.import_module(f"gptjax.configs.{name}").get_config()
  kw = SHAPES_QUICK if quick else SHAPES_FULL
  c.data.data_dir = os.path.join(os.path.dirname(work), "shapes_data")  # vqa and draw share it
  c.data.builder_kwargs = shapes_kwargs(**kw)
  if quick or c.model.vision.image_size != kw["image_size"]:
    _small_model(c, kw["image_size"])
  return c


def draw_config(work: str, quick: bool):
  c = vqa_config(work, quick, "multitask")
  # The tokenizer's size and training do not change what the pipeline does per row.
  c.draw.codes.steps, c.draw.codes.batch_size = 2, 16
  c.draw.codes.channels, c.draw.codes.depth, c.draw.codes.head = 8, 0, 1
  return c


def build(kind: str, work: str, quick: bool, **kw) -> dict:
  """{'config', 'make' (-> a fresh Pipeline, as the loop builds it), 'prep_s'}."""
  from gptjax.train import draw_data
  from gptjax.train.data import load_split, pipeline_for
  t = time.perf_counter()
  c = {"lm": lambda: lm_config(work, kw["seq"], kw["batch"], quick),
       "vqa": lambda: vqa_config(work, quick),
       "draw": lambda: draw_config(work, quick)}[kind]()
  src = load_split(c, c.data.train_split)
  if kind == "draw":
    draw = draw_data.prepare(c, os.path.join(work, "draw_run"), src, progress=False)
    make = lambda: draw_data.pipeline(c, src, draw, batch_size=c.train.batch_size)  # noqa: E731
  else:
    make = lambda: pipeline_for(c, src, train=True, batch_size=c.train.batch_size)  # noqa: E731
  return dict(config=c, make=make, prep_s=time.perf_counter() - t)


# --- the step -------------------------------------------------------------------------------



def stepper(c, first: dict) -> dict:
  """The loop's compiled step on a 1-device mesh: {'run', 'shardings', 'memory', ...}."""
  from gptjax import sharding as shd
  from gptjax.batch import MODEL_KEYS, batch_shardings, check_batch, global_batch
  from gptjax.train.config import validate
  from gptjax.train.optim import make_optimizer
  from gptjax.train.state import create_train_state
  from gptjax.train.step import jit_train_step, make_train_step
  mcfg = validate(c)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = make_optimizer(c)
  graphdef, rest, state, state_sh = create_train_state(mcfg, tx, mesh, c.seed)
  check_batch(first, mcfg)
  sh = {k: v for k, v in batch_shardings(mesh).items() if k in MODEL_KEYS and k in first}
  step = jit_train_step(
      make_train_step(graphdef, rest, tx, accum_steps=c.optim.accum_steps,
                      contrastive_weight=c.train.get("contrastive_weight", 0.0)),
      state_sh, sh, mesh)
  batch = global_batch(first, sh)
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  box = {"state": state}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  def run(n: int, next_batch=None) -> float:
    """Seconds per step over ``n`` steps (fixed batch, or ``next_batch()`` per step)."""
    t = time.perf_counter()
    for _ in range(n):
      b = batch if next_batch is None else global_batch(next_batch(), sh)
      box["state"], m = compiled(box["state"], b)
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t) / n

  return dict(run=run, memory=common.compiled_memory(compiled), compile_s=compile_s,
              params=n_params, batch_shape={k: tuple(v.shape) for k, v in first.items()})


# --- timing ---------------------------------------------------------------------------------

def _count(per_item_s: float, budget_s: float, lo: int, hi: int) -> int:
  return int(min(hi, max(lo, budget_s / max(per_item_s, 1e-6))))


def _drain(it, seconds: float) -> tuple[int, float]:
  """Batches taken from ``it`` as fast as it yields them for about ``seconds``."""
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds:
    next(it)
    n += 1
  return n, time.perf_counter() - t


def pipeline_rate(it, repeats: int, budget_s: float) -> dict:
  """Median batches/s of ``next(it)`` over ``repeats`` windows of ``budget_s``, after one
  window of warm-up that also drains what the prefetch threads had stocked (time-bounded,
  not a batch count estimated from the first calls, which a full buffer makes free)."""
  _drain(it, budget_s)
  rates = [n / dt for n, dt in (_drain(it, budget_s) for _ in range(repeats))]
  return dict(batches_per_s=statistics.median(rates), per_window=rates)


# What the loop gets (gptjax.data.pipeline.batch_iterator), and grain's default read-ahead
# (16 threads, 500 elements = batches here), which the loop used before.
LOOP = (f"loop: {max(1, min(16, os.cpu_count() or 1))} threads, prefetch "
        f"{PREFETCH_BATCHES}")
GRAIN_DEFAULT = "grain default: 16 threads, prefetch 500"
VARIANTS = (LOOP, GRAIN_DEFAULT, "no threads", "2 worker processes")


def iterator(b: dict, variant: str):
  """A fresh iterator over the loop's batches, read as ``variant`` says."""
  import grain
  pipe = b["make"]()
  if variant == LOOP:
    return pipe.iterator
  pipe.iterator.close()
  if variant == "no threads":
    return iter(pipe.dataset.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                               prefetch_buffer_size=0)))
  if variant == GRAIN_DEFAULT:
    return iter(pipe.dataset.to_iter_dataset(grain.ReadOptions()))
  # Processes: no GIL shared with the step's dispatch; each worker reads every 2nd batch.
  ds = pipe.dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2,
                                                          per_worker_buffer_size=4)))


FILL_LIMIT_S = 60.0


def _prefetch_full(it) -> bool:
  """Whether a thread-prefetching grain iterator's buffer is full (every slot computed);
  True for iterators without one. Reads grain's private fields: a benchmark-only probe."""
  buf = getattr(it, "_buffer", None)
  if not buf or not getattr(it, "_target_num_threads", 0):
    return True
  return all(f.done() for f in list(buf))


def _close(it) -> None:
  close = getattr(it, "close", None)
  if close is not None:
    close()  # stop its prefetch threads / workers: they would compete with the next timing


def _log(t0: float, what: str) -> None:
  print(f"  [{time.perf_counter() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)


def measure(name: str, kind: str, kw: dict, work: str, quick: bool, repeats: int) -> dict:
  t0 = time.perf_counter()
  budget = 0.1 if quick else 0.5
  b = build(kind, os.path.join(work, name.split()[0]), quick, **kw)
  _log(t0, f"{name}: data and config ready")
  it = iterator(b, LOOP)
  first = next(it)
  _close(it)  # before compiling: its read-ahead would compete with the compiler
  s = stepper(b["config"], first)
  _log(t0, f"{name}: step compiled")
  s["run"](2)  # warm-up
  inner = _count(s["run"](1), budget, 1, 50)
  fixed = [s["run"](inner) for _ in range(repeats)]

  fill_limit = FILL_LIMIT_S / 10 if quick else FILL_LIMIT_S

  def fed(variant: str) -> dict:
    """Seconds per step of the loop's sequence, next() + global_batch + step, each against
    fixed-batch steps timed next to it (drift on a shared machine): ``first`` right after
    the iterator starts (its prefetch buffer filling: the start of a run, or a resume) vs
    the fixed steps just before; ``steady`` once the buffer is full, interleaved with fixed
    repeats; ``fill_s``: from the first next() until the buffer was full."""
    ref_first = statistics.median(s["run"](inner) for _ in range(repeats))
    it = iterator(b, variant)
    t = time.perf_counter()
    s["run"](2, it.__next__)  # warm-up (and worker start-up)
    first = statistics.median(s["run"](inner, it.__next__) for _ in range(repeats))
    while not _prefetch_full(it) and time.perf_counter() - t < fill_limit:
      s["run"](1, it.__next__)
    fill_s = time.perf_counter() - t
    pairs = [(s["run"](inner), s["run"](inner, it.__next__)) for _ in range(repeats)]
    _close(it)
    ref = statistics.median(p[0] for p in pairs)
    steady = statistics.median(p[1] for p in pairs)
    fixed.extend([ref_first] + [p[0] for p in pairs])
    return dict(first=first, ref_first=ref_first, steady=steady, ref_steady=ref,
                first_over_step=first / ref_first, steady_over_step=steady / ref,
                fill_s=fill_s)

  rates = {LOOP: None}
  for v in rates:
    it = iterator(b, v)
    rates[v] = pipeline_rate(it, repeats, budget)
    _close(it)
  _log(t0, f"{name}: pipeline timed")
  fed_s = {LOOP: fed(LOOP)}
  f = fed_s[LOOP]
  if not quick and (rates[LOOP]["batches_per_s"] * statistics.median(fixed) < TARGET_RATIO
                    or max(f["first_over_step"], f["steady_over_step"]) > TARGET_FED):
    for v in VARIANTS[1:]:  # the loop's reading misses a target: the alternatives
      it = iterator(b, v)
      rates[v] = pipeline_rate(it, repeats, budget)
      _close(it)
      fed_s[v] = fed(v)
  _log(t0, f"{name}: fed step timed")
  step_s = statistics.median(fixed)
  return dict(kind=kind, prep_s=b["prep_s"], params=s["params"], batch_shape=s["batch_shape"],
              compile_s=s["compile_s"], inner_steps=inner, step_s=step_s, step_per_step_s=fixed,
              fed_step_s=fed_s, pipeline=rates,
              ratio={v: r["batches_per_s"] * step_s for v, r in rates.items()},
              memory=s["memory"],
              train_records=(None if kind == "lm" else b["config"].data.builder_kwargs.train_size))


def run(quick: bool = False, repeats: int = 0) -> dict:
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  repeats = repeats or (2 if quick else 5)
  tasks = QUICK if quick else FULL
  out = {}
  with tempfile.TemporaryDirectory(prefix="input_pipeline_") as work:
    for name, (kind, kw) in tasks.items():
      out[name] = measure(name, kind, kw, work, quick, repeats)
  return dict(tasks=out, repeats=repeats,
              skipped=["draw (multitask): --quick leaves it out"] if quick else [])


def targets(res: dict) -> list[tuple[str, bool]]:
  out = []
  for name, r in res["tasks"].items():
    out.append((f"{name}: loop pipeline >= {TARGET_RATIO:g} x step rate",
                r["ratio"][LOOP] >= TARGET_RATIO))
    f = r["fed_step_s"][LOOP]
    out.append((f"{name}: fed step <= {TARGET_FED:g} x fixed-batch step (prefetch full)",
                f["steady_over_step"] <= TARGET_FED))
    out.append((f"{name}: fed step <= {TARGET_FED:g} x fixed-batch step (prefetch filling)",
                f["first_over_step"] <= TARGET_FED))
  return out


def _mib(x) -> str:
  return "n/a" if x is None else f"{x / 2**20:.2f}"


def table(res: dict) -> str:
  lines = ["Pipeline = `next()` alone; ratio = pipeline batches/s / step steps/s; fed = "
           "`global_batch(next(it))` + step as the loop runs them, over the fixed-batch step "
           "timed next to it: first while the prefetch buffer fills (a run's start or a "
           "resume; fill = seconds until it was full), then steady. Other readings are "
           "measured only where the loop's misses a target.", "",
           "| task | batch | params | step (ms) | reading | pipeline (batches/s) | ratio | "
           "fed, filling (ms) | / step | fed, steady (ms) | / step | fill (s) |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in res["tasks"].items():
    bs = r["batch_shape"]["inputs"]
    shape = f"{bs[0]}x{bs[1]}{' + image' if 'image' in r['batch_shape'] else ''}"
    for i, (v, p) in enumerate(r["pipeline"].items()):
      f = r["fed_step_s"][v]
      head = (f"| {name} | {shape} | {r['params']:,} | {r['step_s'] * 1e3:.1f} " if i == 0
              else "| | | | ")
      lines.append(head + f"| {v} | {p['batches_per_s']:,.0f} | {r['ratio'][v]:.1f} | "
                   f"{f['first'] * 1e3:.1f} | {f['first_over_step']:.2f} | "
                   f"{f['steady'] * 1e3:.1f} | {f['steady_over_step']:.2f} | "
                   f"{f['fill_s']:.1f} |")
  lines += ["", "Per-step memory of the compiled train step (`memory_analysis()`, MiB; peak = "
            "argument + output - alias + temp):", "",
            "| task | argument | output | alias | temp | peak per step | compile (s) | "
            "prepare data (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in res["tasks"].items():
    m = r["memory"]
    lines.append(f"| {name} | {_mib(m.get('argument'))} | {_mib(m.get('output'))} | "
                 f"{_mib(m.get('alias'))} | {_mib(m.get('temp'))} | {_mib(m.get('peak'))} | "
                 f"{r['compile_s']:.1f} | {r['prep_s']:.1f} |")
  for s in res.get("skipped", []):
    lines += ["", f"Skipped: {s}."]
  lines += common.targets_lines(targets(res))
  return "\n".join(lines)


def main():
  common.cli(__doc__, run, table)


if __name__ == "__main__":
  main()
