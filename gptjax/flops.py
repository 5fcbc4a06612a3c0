"""Model FLOPs (what a step *must* compute, not what XLA happens to run) and the machine's
measured matmul peak: their ratio is the model FLOPs utilisation (MFU).

The count follows MaxText's training-FLOPs estimate (``calculate_tflops_training_per_device``):
every matmul of a [M, K] x [K, N] shape costs 2·M·K·N in the forward pass and twice that in
the backward pass (the gradients of both operands), so training costs 3x the forward. Per
layer it sums the q/k/v projections (2·D·(N + 2K)·H per token), the output projection
(2·N·H·D), the MLP (2·D·F per input projection — two for SwiGLU — plus 2·F·D for the down
projection) and once the LM head (2·D·V); attention's own two matmuls (Q·Kᵀ and P·V,
4·T·N·H per token for a full mask) are counted at *half* for a causal mask, as MaxText
does, since a causal kernel need only compute the lower triangle. So with
N_mm = the matmul weights (no embedding lookups, positions, norms or biases — a lookup is a
gather and norms / biases are elementwise):

  training  flops/token = 6·N_mm + 6·depth·T·N·H      (causal; 12·depth·T·N·H bidirectional)
  forward   flops/token = 2·N_mm + 2·depth·T·N·H

N_mm counts weights *per applied layer*: with cross-layer sharing (num_unique_layers <
depth) a shared block still costs its FLOPs every time it is applied. The tied LM head is a
matmul against the embedding table and is counted (V·D) like an untied one.

Linear attention has no T² term: inside a chunk of C tokens it is the causal quadratic form
(counted like softmax attention with T replaced by min(C, T)), across chunks it reads and
updates a (H, H) state per head: 2·2·N·H² forward FLOPs per token (φ(k)vᵀ and φ(q)·S).

Not counted: the vision encoder and projector of a VLM (convolutions / a small ViT run once
per image; at the shapes used here they are a few percent of the decoder), elementwise
work (softmax, norms, GELU, the optimizer update) and the cross-entropy.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """N_mm: matmul weights applied per token (per applied layer, LM head included)."""
  d, n, k, h, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  qkv = d * (n + 2 * k) * h
  out = n * h * d
  mlp = d * f * (2 if cfg.mlp_activation == "swiglu" else 1) + f * d
  return cfg.depth * (qkv + out + mlp) + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
  """Forward FLOPs per token of attention's own matmuls (Q·Kᵀ and P·V, all layers)."""
  n, h = cfg.num_heads, cfg.head_dim
  if cfg.attention == "linear":
    c = min(cfg.linear_chunk_size, seq_len)
    return cfg.depth * (4 * c * n * h / 2 + 4 * n * h * h)
  return cfg.depth * 4 * seq_len * n * h * (0.5 if causal else 1.0)


def _check_len(seq_len) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
    raise ValueError(f"seq_len={seq_len!r} is invalid: must be a positive integer")


def flops_per_token(cfg: ModelConfig, seq_len: int, *, train: bool = True,
                    causal: bool = True) -> float:
  """Model FLOPs per token of a ``seq_len``-token sequence (forward + backward with
  ``train``, else forward only). See the module docstring for the formula."""
  _check_len(seq_len)
  fwd = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=causal)
  return 3.0 * fwd if train else float(fwd)


def flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int, *,
                   train: bool = True) -> float:
  """Model FLOPs of one step on ``batch_size`` rows of ``seq_len`` text tokens. A VLM's image
  tokens (``cfg.num_image_tokens``, before the text) go through every block and lengthen
  the attention context, but not through the LM head; its encoder is not counted."""
  _check_len(seq_len)
  p = cfg.num_image_tokens
  total = p + seq_len
  head = 2 * cfg.width * cfg.vocab_size
  blocks = 2 * (matmul_params(cfg) - cfg.width * cfg.vocab_size)
  fwd = (total * (blocks + attention_flops_per_token(cfg, total, causal=True))
         + seq_len * head)
  # A prefix-LM's image tokens attend bidirectionally: the P² block is dense, not half.
  if p and cfg.prefix_lm and cfg.attention == "softmax":
    fwd += cfg.depth * 4 * cfg.num_heads * cfg.head_dim * (p * p / 2)
  return batch_size * fwd * (3.0 if train else 1.0)


PEAK_CACHE_FILE = "peak_flops.json"
PEAK_CACHE_DAYS = 7.0


def peak_cache_path() -> Optional[str]:
  """Where measured peaks are kept: ``$GPTJAX_CACHE_DIR/peak_flops.json`` (default
  ``$XDG_CACHE_HOME/gptjax``, else ``~/.cache/gptjax``); None with ``GPTJAX_CACHE_DIR=none``
  (measure in every process)."""
  d = os.environ.get("GPTJAX_CACHE_DIR")
  if d is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.path.join(base, "gptjax")
  if not d or d.lower() == "none":
    return None
  return os.path.join(os.path.expanduser(d), PEAK_CACHE_FILE)


def _machine_key(dtype: str, n: int, repeats: int) -> str:
  dev = jax.devices()[0]
  return (f"{dev.platform}|{dev.device_kind}|{jax.local_device_count()} devices|"
          f"{os.cpu_count()} cpus|jax {jax.__version__}|{dtype}|n={n}|repeats={repeats}")


def _read_peaks(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):  # missing, unreadable or half-written: measure again
    return {}


def _write_peak(path: str, key: str, flops: float) -> None:
  """Adds one entry, atomically (a reader never sees half a file); a read-only or full disk
  only costs the next process its own measurement."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read_peaks(path)
    data[key] = {"flops": flops, "measured": time.time()}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".peak_flops.")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass


def measure_matmul_flops(dtype: str, n: int, repeats: int) -> float:
  """FLOP/s of the fastest of ``repeats`` jitted (n, n) @ (n, n) ``jnp.dot`` calls, after
  a warm-up run, measured now (``peak_matmul_flops`` is the cached form)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  # Accumulate in the compute dtype like a model layer does (f32 accumulation is what the
  # CPU backend does internally for bf16 anyway).
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


@functools.lru_cache(maxsize=None)
def peak_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """This machine's matmul FLOP/s in ``dtype``: the fastest of ``repeats`` timed runs of a
  jitted (n, n) @ (n, n) ``jnp.dot`` on the default device, after one warm-up run (~1-2 s
  at n=2048 on 2 CPU cores).

  Kept per process and on disk (``peak_cache_path``) for ``PEAK_CACHE_DAYS`` days, keyed by
  the device kind and count, CPU count, jax version and arguments: every run on a machine
  then divides by the same peak (MFUs of two runs compare) and none pays the probe again.
  Delete the file to measure afresh (e.g. after measuring on a busy machine).
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r} is invalid: allowed values are 'float32', "
                     "'bfloat16', 'float16'")
  if n < 64 or repeats < 1:
    raise ValueError(f"n={n}, repeats={repeats} are invalid: need n >= 64, repeats >= 1")
  path = peak_cache_path()
  key = _machine_key(dtype, n, repeats)
  if path is not None:
    entry = _read_peaks(path).get(key)
    try:
      if time.time() - float(entry["measured"]) < PEAK_CACHE_DAYS * 86400:
        return float(entry["flops"])
    except (TypeError, KeyError, ValueError):  # no entry, or not one this code wrote
      pass
  flops = measure_matmul_flops(dtype, n, repeats)
  if path is not None:
    _write_peak(path, key, flops)
  return flops
