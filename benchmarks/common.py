"""What the benchmark scripts share: a compiled program's memory, the targets table, and the
command line of a script run on its own (``python benchmarks/NAME.py [--quick] [--repeats N]
[--json PATH]``)."""
from __future__ import annotations

import argparse
import inspect
import json
from typing import Callable, Iterable


# Seconds to let the previous side's worker threads go idle before timing the next side
# (PyTorch's OpenMP threads spin-wait after a parallel region). A precaution: on 2 cores
# single measurements of the JAX step right after torch work were 0-15 % slower, within
# this machine's run-to-run noise.
SETTLE_S = 0.3


def settle() -> None:
  """Sleep ``SETTLE_S``: called before each timed chunk of an interleaved comparison."""
  import time
  time.sleep(SETTLE_S)


def fixed_batch_step(cfg, c, s: dict, seed: int = 0):
  """gptjax's real jitted train step for ``ModelConfig`` ``cfg`` and run config ``c`` on one
  device, with one random token batch of ``s["batch"]`` x ``s["seq"]`` (vocab
  ``s["vocab"]``) placed on it: -> (jitted step, train state, batch)."""
  import jax
  import numpy as np

  from gptjax import sharding as shd
  from gptjax.batch import batch_shardings
  from gptjax.train.optim import make_optimizer
  from gptjax.train.state import create_train_state
  from gptjax.train.step import jit_train_step, make_train_step
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = make_optimizer(c)
  graphdef, rest, state, state_sh = create_train_state(cfg, tx, mesh, seed)
  keys = ("inputs", "targets", "loss_mask")
  bsh = {k: v for k, v in batch_shardings(mesh).items() if k in keys}
  step = jit_train_step(make_train_step(graphdef, rest, tx), state_sh, bsh, mesh)
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, s["vocab"], (s["batch"], s["seq"] + 1), dtype=np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "loss_mask": np.ones((s["batch"], s["seq"]), np.float32)}
  return step, state, {k: jax.device_put(v, bsh[k]) for k, v in batch.items()}


def compiled_memory(compiled) -> dict:
  """Bytes of a compiled program (``memory_analysis()``): argument, output, alias, temp,
  generated_code, and peak = argument + output - alias + temp (XLA's own peak is 0 or
  absent on CPU; kept as xla_peak where it is not). {} where the backend reports nothing."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: getattr(m, f"{k}_size_in_bytes", None) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  if None not in (out["argument"], out["output"], out["alias"], out["temp"]):
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["xla_peak"] = getattr(m, "peak_memory_in_bytes", None) or None
  return out


def call_times(call: Callable[[], object], sync: Callable[[object], object], repeats: int,
               inner: int = 1) -> list[float]:
  """Seconds per call of ``call()``, one figure per repeat, each the mean of ``inner``
  calls ended by ``sync`` on the last result (``jax.block_until_ready`` for JAX's async
  dispatch; identity for synchronous PyTorch CPU ops). The one timing loop the benchmarks
  share: callers take the min (a peak) or the median (a typical call) of it."""
  import time
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(inner):
      r = call()
    sync(r)
    out.append((time.perf_counter() - t) / inner)
  return out


BANDWIDTH_PROBE_BYTES = 512 << 20  # read_bandwidth's array: far larger than any cache


def read_bandwidth(n_bytes: int = BANDWIDTH_PROBE_BYTES, repeats: int = 5) -> float:
  """This machine's memory read bandwidth in bytes/s: the fastest of ``repeats`` jitted sums
  over an ``n_bytes`` float32 array (far larger than any cache), after one warm-up run.
  The roof of a decode step, which reads every weight once per token: a step can take no
  less than weight bytes / this."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return x.size * 4 / min(call_times(lambda: total(x), jax.block_until_ready, repeats))


def targets_lines(targets: Iterable[tuple[str, bool]]) -> list[str]:
  """The "| target | met |" table (a blank line first) of ``(name, met)`` pairs."""
  return ["", "| target | met |", "|---|---|"] + [
      f"| {name} | {'met' if ok else 'MISSED'} |" for name, ok in targets]


def cli(doc: str, run: Callable[..., dict], table: Callable[[dict], str],
        quick_help: str = "tiny shapes: a smoke check of the machinery, not a measurement"
        ) -> None:
  """Parses the script's flags, runs it, prints its table, writes the raw results as JSON
  with ``--json``. ``--repeats`` exists when ``run`` takes it."""
  ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
  ap.add_argument("--quick", action="store_true", help=quick_help)
  takes_repeats = "repeats" in inspect.signature(run).parameters
  if takes_repeats:
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats (0: the default)")
  ap.add_argument("--json", default=None, help="write the raw results here")
  a = ap.parse_args()
  res = run(a.quick, a.repeats) if takes_repeats else run(a.quick)
  print(table(res))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1, default=str)
