"""Quantized decoding on CPU: float32 vs int8 weight-only vs int8 weights + activations,
GPT-2-small width (random weights, greedy, KV cache), batch 1 and 8.

  python benchmarks/int8_decode.py [--quick] [--repeats 3]

Variants (all through ``gptjax.compress.quantize``, each timed interleaved with the others):
  float32       the model as built
  int8 w        ``ptq_int8(activations=False)`` + ``quantize_embeddings``: int8 weights
                (qwix, per output channel) and int8 token/position tables; activations float
  int8 w+a      ``ptq_int8(static_activations=False)`` + ``quantize_embeddings(
                head_activations=True)``: every matmul, the tied head included, runs
                int8 x int8 -> int32 with a per-token activation scale
  int8 w+a static  the compression pipeline's int8 stage: ``ptq_int8`` with activation
                scales calibrated on random tokens, int8 tables (head weight-only)
Reported: the decode step ((t(new) - t(1)) / (new - 1), medians), its ratio to float32, the
weights' bytes, the decode loop's compiled peak (arguments + outputs - aliased + temporaries,
``memory_analysis()``) and the logits' relative error vs float32 (a 4 x 64 random batch).
qwix's fake-quant forward (``qat_model``) is not a second reference here: it runs the same
quantized dot as PTQ (measured: bit-identical logits); the int8 head is checked against a
NumPy transcription in tests/test_quantize.py.
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

import numpy as np  # noqa: E402

FULL = dict(vocab=50257, seq=1024, width=768, depth=12, heads=12, prompt=32, new=64,
            batches=(1, 8))
QUICK = dict(vocab=260, seq=64, width=64, depth=2, heads=4, prompt=8, new=8, batches=(2,))


def build(s: dict) -> tuple[dict, dict]:
  """The variants, and their logits' relative error vs float32 on a random batch."""
  import jax.numpy as jnp
  from flax import nnx

  from gptjax.compress import quantize as Q
  from gptjax.config import ModelConfig
  from gptjax.init import compiled_init
  from gptjax.model import GPT
  cfg = ModelConfig(vocab_size=s["vocab"], max_seq_len=s["seq"], width=s["width"],
                    depth=s["depth"], num_heads=s["heads"], mlp_dim=4 * s["width"])
  model = compiled_init(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  batch = {"inputs": jnp.asarray(rng.integers(0, s["vocab"], (4, 64)), jnp.int32)}
  variants = {
      "float32": model,
      "int8 w": Q.quantize_embeddings(Q.ptq_int8(model, batch, activations=False)),
      "int8 w+a": Q.quantize_embeddings(Q.ptq_int8(model, batch, static_activations=False),
                                        head_activations=True),
      "int8 w+a static": Q.quantize_embeddings(Q.ptq_int8(model, batch)),
  }
  ref = np.asarray(Q.jit_forward(model, batch), np.float64)
  numerics = {n: dict(rel_error=float(np.linalg.norm(np.asarray(Q.jit_forward(m, batch)) - ref)
                                      / np.linalg.norm(ref)))
              for n, m in variants.items() if n != "float32"}
  return variants, numerics


def _decode_peak(model, tokens: np.ndarray, new: int) -> float:
  """Compiled peak bytes of the decode loop ``generate`` runs for this call."""
  from gptjax import generate as G
  seen = {}
  orig = G._decode

  def spy(*a, **k):
    seen["args"] = (a, k)
    return orig(*a, **k)

  G._decode = spy
  try:
    np.asarray(G.generate(model, tokens, new))
  finally:
    G._decode = orig
  a, k = seen["args"]
  return float(common.compiled_memory(orig.lower(*a, **k).compile())["peak"])


def run(quick: bool = False, repeats: int = 0) -> dict:
  from gptjax.compress import quantize as Q
  from gptjax.generate import generate
  s = QUICK if quick else FULL
  repeats = repeats or (1 if quick else 3)
  variants, numerics = build(s)
  rng = np.random.default_rng(0)
  out = dict(config=s, repeats=repeats, numerics=numerics, batches={},
             weight_bytes={n: float(Q.state_bytes(m)) for n, m in variants.items()})
  for b in s["batches"]:
    tokens = rng.integers(0, s["vocab"], (b, s["prompt"]), dtype=np.int32)
    gens = {n: (lambda m: lambda new: np.asarray(generate(m, tokens, new)))(m)
            for n, m in variants.items()}
    for g in gens.values():  # compile both programs of both calls
      g(1), g(s["new"])
    full = {n: [] for n in gens}
    one = {n: [] for n in gens}
    for _ in range(repeats):
      for n, g in gens.items():
        t = time.perf_counter()
        g(s["new"])
        full[n].append(time.perf_counter() - t)
        t = time.perf_counter()
        g(1)
        one[n].append(time.perf_counter() - t)
    row = {}
    for n in gens:
      step = (statistics.median(full[n]) - statistics.median(one[n])) / (s["new"] - 1)
      row[n] = dict(decode_step_s=step, runs_s=full[n],
                    peak_bytes=_decode_peak(variants[n], tokens, s["new"]))
    out["batches"][b] = row
  return out


def targets(res: dict) -> list[tuple[str, bool]]:
  out = []
  for b, row in res["batches"].items():
    f = row["float32"]["decode_step_s"]
    best = min(row["int8 w"]["decode_step_s"], row["int8 w+a"]["decode_step_s"])
    out.append((f"batch {b}: an int8 decode step <= float32's", best <= f))
    out.append((f"batch {b} (stretch): an int8 decode step <= float32's / 1.5", best * 1.5 <= f))
  return out


def table(res: dict) -> str:
  s = res["config"]
  mib = 2.0**20
  lines = [f"Greedy, random weights, width {s['width']}, {s['depth']} layers, {s['heads']} "
           f"heads, vocab {s['vocab']}; prompt {s['prompt']}, {s['new']} new tokens; median of "
           f"{res['repeats']} interleaved repeats.", "",
           "| batch | variant | decode step (ms) | vs float32 | weights (MiB) | decode peak "
           "(MiB) | logits rel. error |", "|---:|---|---:|---:|---:|---:|---:|"]
  for b, row in res["batches"].items():
    f = row["float32"]["decode_step_s"]
    for n, r in row.items():
      err = res["numerics"].get(n, {}).get("rel_error")
      lines.append(f"| {b} | {n} | {r['decode_step_s'] * 1e3:.1f} | "
                   f"{f / r['decode_step_s']:.2f}x | {res['weight_bytes'][n] / mib:.0f} | "
                   f"{r['peak_bytes'] / mib:.0f} | {'-' if err is None else f'{err:.4f}'} |")
  lines += common.targets_lines(targets(res))
  return "\n".join(lines)


def main():
  common.cli(__doc__, run, table)


if __name__ == "__main__":
  main()
