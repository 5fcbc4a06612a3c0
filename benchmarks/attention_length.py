"""Attention at length: softmax (einsum), blocked softmax and causal linear attention.

  python benchmarks/attention_length.py [--quick] [--json out.json]

B 1, 4 heads x 64, float32, causal. For T = 256 ... 16,384: forward + backward time of
``sum(attention(q, k, v))`` w.r.t. q, k, v (median of interleaved repeats after a warm-up
call) and the compiled program's temp memory (``compiled.memory_analysis()``). The einsum is
compiled everywhere (its memory is reported) but only run while its temp memory stays under
``EINSUM_MAX_BYTES`` and the extrapolated time under ``MAX_RUN_S``. Then the crossover T of
linear vs blocked, per-token decode latency at context 256 ... 8,192 (one new token against
a KV cache of that length vs the recurrent state; ``DECODE_STEPS`` steps inside one jitted
loop, so dispatch is not timed), and linear attention's achieved FLOP/s against its FLOP
count and this machine's float32 matmul peak (a jitted 2048^3 ``jnp.dot``).
Absolute numbers depend on the machine and its load; ratios within one run are meaningful.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.flops import measure_matmul_flops  # noqa: E402
from gptjax.layers import attention as A  # noqa: E402
from gptjax.layers import blocked_attention as BA  # noqa: E402

HEADS, HEAD_DIM, BATCH = 4, 64, 1
LENGTHS = tuple(256 * 2**i for i in range(7))  # 256 ... 16,384
QUICK_LENGTHS = (256, 512, 1024)
DECODE_CONTEXTS = tuple(256 * 2**i for i in range(6))  # 256 ... 8,192
QUICK_DECODE_CONTEXTS = (256, 1024)
DECODE_STEPS = 128  # per jitted call: a linear step is ~10 us, dispatch ~50 us
DECODE_REPEATS = 9
EINSUM_MAX_BYTES = 8 * 2**30
MAX_RUN_S = 40.0  # skip a method once one call is predicted (x4 per doubling) above this
KINDS = ("einsum", "blocked", "linear")


def _attend(kind):
  if kind == "linear":
    return lambda q, k, v: A.linear_attention(q, k, v)
  impl = "xla" if kind == "einsum" else "blocked"
  return lambda q, k, v: A.softmax_attention(q, k, v, causal=True, implementation=impl)


def _fwd_bwd(kind):
  f = _attend(kind)
  return jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))


def _qkv(t):
  keys = jax.random.split(jax.random.key(t), 3)
  return [jax.random.normal(kk, (BATCH, t, HEADS, HEAD_DIM), jnp.float32) for kk in keys]


def _time(fn, args, repeats):
  return common.call_times(lambda: fn(*args), jax.block_until_ready, repeats)


def linear_flops(t: int, chunk: int = 64, heads: int = HEADS, h: int = HEAD_DIM) -> dict:
  """Multiply-adds x 2 of ``linear_attention``'s chunked form, per call (B = 1).

  Per chunk of C tokens and head: q k^T (2C^2 H), masked A v (2C^2 E), q S and q z
  (2CHE + 2CH), the state update k^T v and sum k (2CHE + CH), the row sums of A (C^2).
  The tail chunk is padded, so T rounds up to chunks. The backward of each matmul is two
  matmuls of the same size: fwd+bwd = 3x forward.
  """
  c = min(chunk, t)
  tp = -(-t // c) * c
  per_chunk = 2 * c * c * h + 2 * c * c * h + 4 * c * h * h + 3 * c * h + c * c
  fwd = heads * (tp // c) * per_chunk
  return {"forward": fwd, "fwd_bwd": 3 * fwd}


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """Measured now, not the cached ``peak_matmul_flops``: taken before and after the long runs
  (the load varies), best of ``repeats`` (on a shared machine the fastest call is the
  closest to the peak)."""
  return measure_matmul_flops("float32", n, repeats)


def _decode_fns(ctx):
  """One token against a context of ``ctx``: KV cache (softmax) vs recurrent state."""
  def kv_loop(q, k, v, kc, vc):
    def step(i, carry):
      kc, vc, acc = carry
      pos = ctx - DECODE_STEPS + i  # the cache holds ctx slots; fill its last ones
      kc = jax.lax.dynamic_update_slice_in_dim(kc, k, pos, axis=1)
      vc = jax.lax.dynamic_update_slice_in_dim(vc, v, pos, axis=1)
      y = A.softmax_attention(q, kc, vc, causal=True, q_offset=pos, implementation="auto")
      return kc, vc, acc + y.sum()  # a scalar keeps y live without a pass over the cache
    return jax.lax.fori_loop(0, DECODE_STEPS, step, (kc, vc, jnp.float32(0)))[2]

  def lin_loop(q, k, v, s, z):
    def step(i, carry):
      s, z, acc = carry
      y, st = A.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], A.LinearState(s, z))
      return st.s, st.z, acc + y.sum()
    return jax.lax.fori_loop(0, DECODE_STEPS, step, (s, z, jnp.float32(0)))[2]

  return jax.jit(kv_loop), jax.jit(lin_loop)


def run(quick: bool = False) -> dict:
  lengths = QUICK_LENGTHS if quick else LENGTHS
  repeats = 3 if quick else 5
  res = {"config": dict(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, dtype="float32",
                        causal=True, linear_chunk=64, block=BA.BLOCK_SIZE or "auto (default_block)",
                        backend=jax.default_backend(), jax=jax.__version__),
         "train": {}, "decode": {}}
  last_s = {k: 0.0 for k in KINDS}
  peak = matmul_peak()
  for t in lengths:
    args = _qkv(t)
    row, fns = {}, {}
    for kind in KINDS:
      fn = _fwd_bwd(kind)
      mem = common.compiled_memory(fn.lower(*args).compile())
      row[kind] = {"temp_bytes": int(mem["temp"]), "peak_bytes": int(mem["peak"])}
      if kind == "einsum" and mem["temp"] > EINSUM_MAX_BYTES:
        row[kind]["skipped"] = f"temp memory > {EINSUM_MAX_BYTES / 2**30:.0f} GiB"
      elif 4 * last_s[kind] > MAX_RUN_S:
        row[kind]["skipped"] = f"predicted > {MAX_RUN_S:.0f} s per call"
      else:
        fns[kind] = fn
    for kind, fn in fns.items():  # warm-up (compile + first run)
      last_s[kind] = _time(fn, args, 1)[0]
    times = {k: [] for k in fns}
    for _ in range(repeats if t < 8192 else 3):
      for kind, fn in fns.items():
        times[kind] += _time(fn, args, 1)
    for kind, ts in times.items():
      row[kind]["seconds"] = float(np.median(ts))
      row[kind]["all_seconds"] = ts
      last_s[kind] = row[kind]["seconds"]
    res["train"][t] = row
    print(f"T={t}: " + ", ".join(f"{k} {v.get('seconds', float('nan')) * 1e3:.1f} ms"
                                 for k, v in row.items()), flush=True)

  peak = max(peak, matmul_peak())  # before and after the long runs: the load varies
  res["matmul_peak_flops"] = peak
  for t, row in res["train"].items():
    fl = linear_flops(t)
    if "seconds" in row["linear"]:
      row["linear"]["flops"] = fl["fwd_bwd"]
      row["linear"]["flops_per_s"] = fl["fwd_bwd"] / row["linear"]["seconds"]
      row["linear"]["x_of_flop_time"] = row["linear"]["seconds"] / (fl["fwd_bwd"] / peak)
  cross = [t for t, r in res["train"].items()
           if "seconds" in r["linear"] and "seconds" in r["blocked"]
           and r["linear"]["seconds"] < r["blocked"]["seconds"]]
  res["crossover_T"] = min(cross) if cross else None
  res["linear_faster_everywhere"] = bool(cross) and len(cross) == len(res["train"])

  for ctx in (QUICK_DECODE_CONTEXTS if quick else DECODE_CONTEXTS):
    tok = [x[:, :1] for x in _qkv(1)]
    kv, lin = _decode_fns(ctx)
    cache = [jnp.zeros((BATCH, ctx, HEADS, HEAD_DIM), jnp.float32) for _ in range(2)]
    st = A.LinearState.zeros(BATCH, HEADS, HEAD_DIM)
    jobs = {"kv_cache": (kv, (*tok, *cache)), "linear_state": (lin, (*tok, st.s, st.z))}
    for fn, a in jobs.values():
      jax.block_until_ready(fn(*a))
    times = {k: [] for k in jobs}
    for _ in range(3 if quick else DECODE_REPEATS):
      for k, (fn, a) in jobs.items():
        times[k] += _time(fn, a, 1)
    res["decode"][ctx] = {k: float(np.median(v)) / DECODE_STEPS for k, v in times.items()}
  return res


def targets(res: dict) -> list[tuple[str, bool]]:
  tr, dec = res["train"], res["decode"]
  ts = sorted(tr)
  out = []
  lo, hi = ts[0], ts[-1]
  per_t = lambda t: tr[t]["blocked"]["temp_bytes"] / t
  # Linear in T: temp bytes per token at the longest T no more than 1.5x the shortest's
  # (a T^2 term would grow it 64x over 256 -> 16,384).
  out.append((f"blocked softmax temp memory linear in T (bytes/token at {hi:,} <= 1.5 x at "
              f"{lo:,})", per_t(hi) <= 1.5 * per_t(lo)))
  if 8192 in tr and "seconds" in tr[8192]["blocked"] and "seconds" in tr[8192]["linear"]:
    out.append(("linear >= 4 x faster than blocked softmax at T = 8,192",
                tr[8192]["blocked"]["seconds"] >= 4 * tr[8192]["linear"]["seconds"]))
  cs = sorted(dec)
  if cs:
    out.append((f"linear decode at context {cs[-1]:,} <= 1.2 x at {cs[0]:,}",
                dec[cs[-1]]["linear_state"] <= 1.2 * dec[cs[0]]["linear_state"]))
  x = [r["linear"]["x_of_flop_time"] for r in tr.values() if "x_of_flop_time" in r["linear"]]
  if x:
    out.append(("linear attention within 2 x of its FLOP time at the matmul peak (every T)",
                max(x) <= 2.0))
  return out


def table(results: dict) -> str:
  mib = lambda b: f"{b / 2**20:,.1f}"
  lines = ["| T | einsum ms | blocked ms | linear ms | einsum temp MiB | blocked temp MiB "
           "| linear temp MiB | blocked / linear time | linear GFLOP/s | linear x FLOP time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for t, r in results["train"].items():
    ms = {k: (f"{r[k]['seconds'] * 1e3:,.1f}" if "seconds" in r[k] else "skipped")
          for k in KINDS}
    ratio = (f"{r['blocked']['seconds'] / r['linear']['seconds']:.2f}"
             if "seconds" in r["blocked"] and "seconds" in r["linear"] else "")
    lin = r["linear"]
    lines.append(f"| {t:,} | {ms['einsum']} | {ms['blocked']} | {ms['linear']} "
                 f"| {mib(r['einsum']['temp_bytes'])} | {mib(r['blocked']['temp_bytes'])} "
                 f"| {mib(lin['temp_bytes'])} | {ratio} "
                 f"| {lin.get('flops_per_s', float('nan')) / 1e9:.1f} "
                 f"| {lin.get('x_of_flop_time', float('nan')):.1f} |")
  skipped = [f"einsum at T={t:,}: {r['einsum']['skipped']}" for t, r in results["train"].items()
             if "skipped" in r["einsum"]]
  skipped += [f"{k} at T={t:,}: {r[k]['skipped']}" for t, r in results["train"].items()
              for k in ("blocked", "linear") if "skipped" in r[k]]
  lines.append("")
  if skipped:
    lines.append("Skipped: " + "; ".join(skipped) + ".")
  cross = results["crossover_T"]
  lines.append(f"Crossover (linear faster than blocked softmax, fwd+bwd): T = {cross:,}"
               + (" (the smallest T measured: linear is faster everywhere)"
                  if results["linear_faster_everywhere"] else "") if cross else
               "Crossover: linear never faster than blocked at the measured T.")
  lines.append(f"float32 matmul peak (2048^3 jnp.dot): {results['matmul_peak_flops'] / 1e9:.1f}"
               " GFLOP/s.")
  lines += ["", "| context | KV-cache decode us/token | linear-state decode us/token |",
            "|---|---|---|"]
  for ctx, d in results["decode"].items():
    lines.append(f"| {ctx:,} | {d['kv_cache'] * 1e6:,.1f} | {d['linear_state'] * 1e6:,.1f} |")
  lines += common.targets_lines(targets(results))
  return "\n".join(lines)


def main():
  common.cli(__doc__, run, table, quick_help='T up to 1,024, contexts 256 and 1,024')


if __name__ == "__main__":
  main()
