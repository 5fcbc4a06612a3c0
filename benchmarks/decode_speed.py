"""Decode throughput (new tokens/s) of the jitted sampler, per preset and attention kind.

Run: python benchmarks/decode_speed.py [--batch 8 --prompt 16 --new 64]
Each configuration is compiled once (warm-up) and then timed over several calls; ratios
between rows of one run are meaningful, absolute numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptjax


def measure(cfg, batch: int, prompt: int, new: int, repeats: int = 3, image=None) -> float:
  model = (gptjax.VLM if cfg.vision is not None else gptjax.GPT)(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((batch, prompt), jnp.int32)
  gptjax.generate.generate(model, tokens, new, image=image).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    gptjax.generate.generate(model, tokens, new, image=image).block_until_ready()
    times.append(time.perf_counter() - t)
  return batch * new / float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new", type=int, default=64)
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch={args.batch} "
        f"prompt={args.prompt} new={args.new}")
  print("| preset | attention | params | new tokens/s |")
  print("|---|---|---|---|")
  for name in ("tiny", "mini"):
    for att in ("softmax", "linear"):
      cfg = gptjax.preset(name, attention=att)
      cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.prompt + args.new))
      tps = measure(cfg, args.batch, args.prompt, args.new)
      n = gptjax.count_params(nnx.eval_shape(lambda: gptjax.GPT(cfg, rngs=nnx.Rngs(0))))
      print(f"| {name} | {att} | {n:,} | {tps:,.0f} |")


if __name__ == "__main__":
  main()
