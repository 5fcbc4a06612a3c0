"""`make demo` (until the training system lands): build the presets, run a VLM forward
pass on procedurally drawn images and sample from it, and time decoding."""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptjax
from gptjax.data.tokenizer import ByteTokenizer


def main():
  print(f"gptjax {gptjax.__version__}, jax {jax.__version__}, devices: {jax.devices()}")
  for name in gptjax.preset_names():
    abstract = nnx.eval_shape(lambda: gptjax.GPT(gptjax.preset(name), rngs=nnx.Rngs(0)))
    print(f"  preset {name:10s} {gptjax.count_params(abstract):>13,d} parameters")
  tok = ByteTokenizer()
  cfg = gptjax.preset("mini", vision=gptjax.VisionConfig(kind="cnn", image_size=32))
  vlm = gptjax.VLM(cfg, rngs=nnx.Rngs(0))
  images = np.zeros((2, 32, 32, 3), np.float32)
  images[0, 8:20, 8:20, 0] = 1.0  # a red square
  images[1, 12:28, 4:20, 2] = 1.0  # a blue square
  prompt = jnp.asarray([tok.encode("a picture of", bos=True)] * 2, jnp.int32)
  t = time.perf_counter()
  out = gptjax.generate.generate(vlm, prompt, 24, image=images, temperature=0.8, top_k=40)
  out.block_until_ready()
  print(f"VLM ({gptjax.count_params(vlm):,} params, untrained) sampled in "
        f"{time.perf_counter() - t:.2f}s incl. compile:")
  for row in tok.decode_batch(out):
    print("  ", repr(row))
  for att in ("softmax", "linear"):
    m = gptjax.GPT(dataclasses.replace(cfg, vision=None, attention=att), rngs=nnx.Rngs(0))
    x = jnp.zeros((8, 16), jnp.int32)
    gptjax.generate.generate(m, x, 64).block_until_ready()
    t = time.perf_counter()
    gptjax.generate.generate(m, x, 64).block_until_ready()
    print(f"mini/{att}: {8 * 64 / (time.perf_counter() - t):,.0f} new tokens/s (greedy, B=8)")


if __name__ == "__main__":
  main()
