"""Greedy generation: ``gptjax.generate`` vs ``transformers`` ``GPT2LMHeadModel.generate``
(PyTorch CPU), the same GPT-2-small config built in code, random weights, KV cache on.

  python benchmarks/generate_speed.py [--quick] [--repeats 3]

Batch 1 and 8, prompt 32, 128 new tokens (``--quick``: a 2-layer 64-wide model, prompt 8,
16 new). Reported per side and batch: new tokens/s (median of interleaved repeats after
warm-up), time to first token (a 1-new-token call: prefill + one sample), the decode step
((t(new) - t(1)) / (new - 1)), gptjax's first-call time (trace + compile + run) and whether
a second prompt length compiles the decode loop again. Against the memory roof: a decode
step reads every weight once, so weight bytes / the measured read bandwidth
(``common.read_bandwidth``) is the fastest any step can be; the table shows each side's
step over that.
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
import numpy as np  # noqa: E402

FULL = dict(vocab=50257, seq=1024, width=768, depth=12, heads=12, prompt=32, new=128,
            batches=(1, 8))
QUICK = dict(vocab=260, seq=64, width=64, depth=2, heads=4, prompt=8, new=16, batches=(1, 8))


def gptjax_side(s: dict):
  from flax import nnx

  from gptjax.config import ModelConfig
  from gptjax.generate import _decode, _prefill, generate
  from gptjax.model import GPT
  cfg = ModelConfig(vocab_size=s["vocab"], max_seq_len=s["seq"], width=s["width"],
                    depth=s["depth"], num_heads=s["heads"], mlp_dim=4 * s["width"])
  model = GPT(cfg, rngs=nnx.Rngs(0))
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  def gen(tokens: np.ndarray, new: int):
    return np.asarray(generate(model, tokens, new))  # np.asarray waits for the result

  return gen, (_prefill, _decode), weight_bytes


def hf_side(s: dict):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  cfg = GPT2Config(vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["width"],
                   n_layer=s["depth"], n_head=s["heads"], activation_function="gelu_new",
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = GPT2LMHeadModel(cfg).eval()

  def gen(tokens: np.ndarray, new: int):
    with torch.inference_mode():
      out = model.generate(torch.from_numpy(tokens.astype(np.int64)),
                           attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           use_cache=True, pad_token_id=0)
    return out[:, tokens.shape[1]:].numpy()

  return gen


def _time(fn, *args) -> float:
  t = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t


def run(quick: bool = False, repeats: int = 0) -> dict:
  s = QUICK if quick else FULL
  repeats = repeats or (2 if quick else 3)
  jgen, jitted, weight_bytes = gptjax_side(s)
  sides = {"gptjax": jgen, "transformers": hf_side(s)}
  rng = np.random.default_rng(0)
  # The memory roof: a decode step reads every weight once, whatever the batch.
  probe = common.BANDWIDTH_PROBE_BYTES
  out = dict(config=s, repeats=repeats, batches={}, weight_bytes=weight_bytes,
             read_bandwidth=common.read_bandwidth(probe), read_bandwidth_probe_bytes=probe)
  for b in s["batches"]:
    prompt = rng.integers(0, s["vocab"], (b, s["prompt"]), dtype=np.int32)
    first = {name: _time(g, prompt, s["new"]) for name, g in sides.items()}  # incl. compile
    for g in sides.values():
      g(prompt, 1)  # warm-up (and compile) of the 1-token call
    full = {n: [] for n in sides}
    one = {n: [] for n in sides}
    for _ in range(repeats):
      for name, g in sides.items():
        common.settle()
        full[name].append(_time(g, prompt, s["new"]))
        one[name].append(_time(g, prompt, 1))
    row = {}
    for name in sides:
      t_full, t_one = statistics.median(full[name]), statistics.median(one[name])
      row[name] = dict(tokens_per_s=b * s["new"] / t_full, total_s=t_full, ttft_s=t_one,
                       decode_step_s=(t_full - t_one) / (s["new"] - 1),
                       first_call_s=first[name], runs_s=full[name])
    out["batches"][b] = row
  # Other prompt lengths: which of the two programs (prefill, decode loop) compile again?
  prefill, decode = jitted
  out["new_prompt_len"] = {}
  for extra in (1, s["prompt"] + 1):  # the same prompt bucket (maybe), the next one
    before = prefill._cache_size(), decode._cache_size()
    t_new = s["prompt"] + extra
    t = _time(jgen, rng.integers(0, s["vocab"], (1, t_new), dtype=np.int32), s["new"])
    out["new_prompt_len"][t_new] = dict(prefill_programs=prefill._cache_size() - before[0],
                                        decode_programs=decode._cache_size() - before[1],
                                        first_call_s=t)
  return out


def targets(res: dict) -> list[tuple[str, bool]]:
  out = []
  bs = res["batches"]
  for b, row in bs.items():
    out.append((f"batch {b}: gptjax tokens/s >= 2 x transformers",
                row["gptjax"]["tokens_per_s"] >= 2 * row["transformers"]["tokens_per_s"]))
  if len(bs) >= 2:
    lo, hi = sorted(bs)[0], sorted(bs)[-1]
    out.append((f"gptjax decode step at batch {hi} <= 2 x batch {lo}",
                bs[hi]["gptjax"]["decode_step_s"] <= 2 * bs[lo]["gptjax"]["decode_step_s"]))
  out.append(("a new prompt length does not recompile the decode loop",
              all(n["decode_programs"] == 0 for n in res["new_prompt_len"].values())))
  return out


def table(res: dict) -> str:
  s = res["config"]
  lines = [f"Greedy, random weights, width {s['width']}, {s['depth']} layers, {s['heads']} heads, "
           f"vocab {s['vocab']}; prompt {s['prompt']}, {s['new']} new tokens; median of "
           f"{res['repeats']} interleaved repeats.", "",
           "| batch | side | new tokens/s | vs transformers | time to first token (ms) | "
           "decode step (ms) | first call (s) |", "|---:|---|---:|---:|---:|---:|---:|"]
  for b, row in res["batches"].items():
    ref = row["transformers"]["tokens_per_s"]
    for name, r in row.items():
      lines.append(f"| {b} | {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ref:.2f} | "
                   f"{r['ttft_s'] * 1e3:.0f} | {r['decode_step_s'] * 1e3:.1f} | "
                   f"{r['first_call_s']:.2f} |")
  lines += ["", "New prompt lengths after the batch-1 runs at prompt "
            f"{s['prompt']} (prefill and decode loop are two programs, compiled at "
            "bucketed shapes: prompt, output and cache powers of two, the cache >= 64 "
            "slots):", "",
            "| prompt length | new prefill programs | new decode programs | first call (s) |",
            "|---:|---:|---:|---:|"]
  lines += [f"| {t} | {n['prefill_programs']} | {n['decode_programs']} | "
            f"{n['first_call_s']:.2f} |" for t, n in res["new_prompt_len"].items()]
  if "read_bandwidth" in res:
    bw, wb = res["read_bandwidth"], res["weight_bytes"]
    roof = wb / bw
    probe = res.get("read_bandwidth_probe_bytes", common.BANDWIDTH_PROBE_BYTES)
    lines += ["", f"Memory roof: {wb / 2**20:,.0f} MiB of float32 weights, read bandwidth "
              f"{bw / 1e9:.1f} GB/s (jitted sum over {probe / 2**20:,.0f} MiB), so no decode "
              f"step can take less than {roof * 1e3:.1f} ms.", "",
              "| batch | side | decode step (ms) | weights read at (GB/s) | step / roof |",
              "|---:|---|---:|---:|---:|"]
    for b, row in res["batches"].items():
      for name, r in row.items():
        st = r["decode_step_s"]
        lines.append(f"| {b} | {name} | {st * 1e3:.1f} | {wb / st / 1e9:.1f} | "
                     f"{st / roof:.2f} |")
      half = row["transformers"]["decode_step_s"] / 2
      lines.append(f"| {b} | 2 x transformers needs | {half * 1e3:.1f} | "
                   f"{wb / half / 1e9:.1f} | {half / roof:.2f} |")
  lines += common.targets_lines(targets(res))
  return "\n".join(lines)


def main():
  common.cli(__doc__, run, table)


if __name__ == "__main__":
  main()
