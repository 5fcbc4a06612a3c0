"""Quality bar on real text: gptjax vs a plain PyTorch GPT of the same shape on the
public-domain ``sherlock.txt`` (first 90 % train, last 10 % validation, split by position as
nanoGPT does), byte level, then with a BPE tokenizer trained on the training split.

  python benchmarks/text_quality.py [--steps 2000] [--skip-torch] [--bpe-vocab 1024]
      [--windows random|fixed|both] [--tokenizers byte,bpe]

Shape (the common small-CPU recipe): 4 layers, 4 heads, width 128, context 64, batch 12,
AdamW lr 1e-3 (warmup 100, cosine to 0.1x), clip 1.0, weight decay 0.1 on matrices.
Reported: validation loss per *character* of the raw validation text (nats/char and
bits/char: a tokenizer-independent unit), and the wall time of the whole run (start-up,
compile and data included). gptjax trains through ``gptjax.runs.train`` on pre-tokenised
``tokens`` data (random windows); PyTorch reads random windows from the same token array.
``--windows both`` also trains gptjax on shuffled fixed (non-overlapping) windows: which
trains better per step (same steps, batch and seed; loss on the same validation windows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHERLOCK = os.path.join(ROOT, "..", "shared", "data", "sherlock.txt")
SHAPE = dict(depth=4, num_heads=4, width=128, seq=64, batch=12, lr=1e-3, warmup=100,
             end_lr_ratio=0.1, weight_decay=0.1, clip=1.0)


def gptjax_run(tokens_dir: str, tokenizer: str, steps: int, workdir: str,
               windows: str = "random") -> dict:
  import ml_collections

  from gptjax.runs import base_config, load_model, train
  from gptjax.train.config import model_section
  from gptjax.train.evaluate import evaluate
  s = SHAPE
  c = base_config()
  tok_vocab = json.load(open(os.path.join(tokens_dir, "meta.json")))["vocab_size"]
  c.model = model_section("mini", vocab_size=tok_vocab, max_seq_len=s["seq"], width=s["width"],
                          depth=s["depth"], num_heads=s["num_heads"], num_kv_heads=None,
                          mlp_dim=4 * s["width"], position="learned", dropout=0.0)
  c.data.name, c.data.task, c.data.tokenizer = "tokens", "lm", tokenizer
  c.data.paths, c.data.seq_len = (tokens_dir,), s["seq"]
  c.data.builder_kwargs = ml_collections.ConfigDict(dict(windows=windows))
  c.data.test_split = ""
  c.mesh.data = 1
  c.optim.update(lr=s["lr"], warmup_steps=s["warmup"], end_lr_ratio=s["end_lr_ratio"],
                 weight_decay=s["weight_decay"], clip_norm=s["clip"])
  c.train.steps, c.train.batch_size, c.train.log_every = steps, s["batch"], 100
  c.checkpoint.every = steps
  c.eval.every, c.eval.at_end, c.eval.batch_size = 0, False, 64
  c.logging.tensorboard = c.logging.plot = False
  t0 = time.perf_counter()
  train(c, workdir)
  wall = time.perf_counter() - t0
  c.data.builder_kwargs.windows = "fixed"  # every validation token predicted once
  metrics, _ = evaluate(load_model(workdir), c, "validation", max_batches=10**9,
                        decode_examples=0)
  return dict(wall_s=wall, val_loss_per_token=metrics["loss"], val_tokens=metrics["tokens"])


def torch_run(tokens_dir: str, steps: int, seed: int = 0) -> dict:
  import torch
  from torch import nn

  sys.path.insert(0, ROOT)
  from benchmarks.torch_gpt import GPT, adamw, make_train_step, warmup_cosine
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(seed)
  s = SHAPE
  meta = json.load(open(os.path.join(tokens_dir, "meta.json")))
  load = lambda split: np.fromfile(os.path.join(tokens_dir, f"{split}.tokens"),  # noqa: E731
                                   dtype=np.dtype(meta["dtype"])).astype(np.int64)
  t0 = time.perf_counter()
  train_ids, val_ids = torch.from_numpy(load("train")), torch.from_numpy(load("validation"))
  V, D, T = meta["vocab_size"], s["width"], s["seq"]
  model = GPT(V, T, D, s["depth"], s["num_heads"])
  opt = adamw(model, s["lr"], s["weight_decay"])
  lr_at = warmup_cosine(s["lr"], s["warmup"], steps, s["end_lr_ratio"])
  train_step = make_train_step(model, opt, s["clip"])

  gen = torch.Generator().manual_seed(seed)
  for step in range(steps):
    ix = torch.randint(len(train_ids) - T - 1, (s["batch"],), generator=gen)
    x = torch.stack([train_ids[i:i + T] for i in ix])
    y = torch.stack([train_ids[i + 1:i + T + 1] for i in ix])
    train_step(x, y, lr=lr_at(step))
  wall = time.perf_counter() - t0
  model.eval()
  total, count = 0.0, 0
  with torch.no_grad():
    n = (len(val_ids) - 1) // T
    for i in range(0, n, 64):
      rows = range(i, min(i + 64, n))
      x = torch.stack([val_ids[r * T:r * T + T] for r in rows])
      y = torch.stack([val_ids[r * T + 1:r * T + T + 1] for r in rows])
      total += float(nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1),
                                                 reduction="sum"))
      count += y.numel()
  return dict(wall_s=wall, val_loss_per_token=total / count, val_tokens=count)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--bpe-vocab", type=int, default=1024)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--windows", choices=("random", "fixed", "both"), default="random",
                  help="gptjax's training windows (both: one run of each)")
  ap.add_argument("--tokenizers", default="byte,bpe", help="comma-separated: byte, bpe")
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--json", default=None, help="also write the results here")
  args = ap.parse_args()
  sys.path.insert(0, ROOT)
  from gptjax.data.tokenizers import save_tokenizer, train as train_tokenizer
  from gptjax.data.tokens import pretokenize
  work = args.workdir or tempfile.mkdtemp(prefix="text_quality_")
  text = open(SHERLOCK, encoding="utf-8").read()
  cut = len(text) - round(0.1 * len(text))
  val_chars = len(text) - cut
  os.makedirs(os.path.join(work, "text"), exist_ok=True)
  with open(os.path.join(work, "text", "sherlock.txt"), "w", encoding="utf-8", newline="") as f:
    f.write(text)
  with open(os.path.join(work, "train_split.txt"), "w", encoding="utf-8", newline="") as f:
    f.write(text[:cut])  # the BPE tokenizer sees the training split only
  kinds = {k.strip() for k in args.tokenizers.split(",")}
  if not kinds or kinds - {"byte", "bpe"}:
    ap.error(f"--tokenizers={args.tokenizers!r}: allowed values are byte, bpe")
  modes = ("random", "fixed") if args.windows == "both" else (args.windows,)
  bpe_dir = os.path.join(work, "bpe")
  if "bpe" in kinds:
    save_tokenizer(train_tokenizer("bpe", [os.path.join(work, "train_split.txt")],
                                   args.bpe_vocab), bpe_dir)
  rows = []
  for name, tok in (("byte", "byte"), (f"BPE {args.bpe_vocab}", bpe_dir)):
    if name.split()[0].lower() not in kinds:
      continue
    tdir = os.path.join(work, f"tokens_{name.split()[0].lower()}")
    pretokenize([os.path.join(work, "text")], tdir, tok, validation_fraction=0.1,
                split_mode="tail", progress=False)
    tok_path = "byte" if tok == "byte" else os.path.join(tdir, "tokenizer")
    runs = {}
    for mode in modes:
      label = "gptjax" if mode == "random" else f"gptjax ({mode} windows)"
      runs[label] = gptjax_run(tdir, tok_path, args.steps,
                               os.path.join(work, f"run_{name[:4]}_{mode}"), mode)
    if not args.skip_torch:
      runs["PyTorch eager"] = torch_run(tdir, args.steps)
    # Mean loss per token x the validation split's tokens per character: the same conversion
    # for both (each may leave out a few windows at the end of the split).
    split_tokens = json.load(open(os.path.join(tdir, "meta.json")))["tokens"]["validation"]
    for fw, r in runs.items():
      nats = r["val_loss_per_token"] * split_tokens / val_chars
      rows.append(dict(tokenizer=name, framework=fw, nats_per_char=nats,
                       bits_per_char=nats / math.log(2), wall_s=r["wall_s"],
                       tokens_per_char=split_tokens / val_chars))
      print(json.dumps(rows[-1]), flush=True)
  print(f"\n{args.steps} steps; validation = last 10 % of sherlock.txt ({val_chars:,} chars)\n")
  print("| tokenizer | framework | val nats/char | val bits/char | wall time (s) | tokens/char |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['tokenizer']} | {r['framework']} | {r['nats_per_char']:.3f} | "
          f"{r['bits_per_char']:.3f} | {r['wall_s']:.0f} | {r['tokens_per_char']:.3f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
