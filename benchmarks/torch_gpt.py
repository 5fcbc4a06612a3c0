"""The plain PyTorch GPT that benchmarks compare gptjax against (text_quality, train_speed).

GPT-2's layout, as gptjax builds it: learned positions, pre-norm blocks (LayerNorm ->
multi-head causal attention, LayerNorm -> Linear-GELU(tanh)-Linear), a final LayerNorm and
the LM head tied to the token table; every >= 2-D weight N(0, 0.02). AdamW with weight decay
on matrices only (nanoGPT's rule, like ``gptjax.train.optim.decay_mask``) and global-norm
gradient clipping. Imported lazily by callers: torch is a ``bench`` extra, never a runtime
dependency of gptjax.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn


class Block(nn.Module):

  def __init__(self, width: int, heads: int, mlp_dim: int):
    super().__init__()
    self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(approximate="tanh"),
                             nn.Linear(mlp_dim, width))

  def forward(self, x, mask):
    h = self.ln1(x)
    x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
    return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
  """(B, T) int64 token ids -> (B, T, vocab) logits."""

  def __init__(self, vocab: int, seq_len: int, width: int, depth: int, heads: int,
               mlp_dim: Optional[int] = None):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
    self.blocks = nn.ModuleList(Block(width, heads, mlp_dim or 4 * width) for _ in range(depth))
    self.ln_f = nn.LayerNorm(width)
    for p in self.parameters():
      if p.dim() >= 2:
        nn.init.normal_(p, std=0.02)

  def forward(self, idx):
    t = idx.shape[1]
    x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
    mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), 1)
    for b in self.blocks:
      x = b(x, mask)
    return self.ln_f(x) @ self.wte.weight.T  # tied head


def adamw(model: nn.Module, lr: float, weight_decay: float, *, betas=(0.9, 0.95),
          eps: float = 1e-8) -> torch.optim.AdamW:
  """AdamW decaying matrices only (biases, norm scales: no decay)."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  other = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": other, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def warmup_cosine(lr: float, warmup: int, steps: int, end_lr_ratio: float) -> Callable[[int], float]:
  """Linear warmup to ``lr``, cosine to ``lr * end_lr_ratio`` at ``steps``."""
  def lr_at(step: int) -> float:
    if step < warmup:
      return lr * step / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    end = lr * end_lr_ratio
    return end + 0.5 * (lr - end) * (1 + math.cos(math.pi * frac))
  return lr_at


def make_train_step(model: nn.Module, opt: torch.optim.Optimizer, clip: float, *,
                    compile: bool = False) -> Callable:
  """``step(x, y, lr=None) -> loss tensor``: forward, cross-entropy, backward, clip, AdamW.
  ``compile``: the model's forward/backward and the optimizer update go through
  ``torch.compile`` (inductor; needs a C++ compiler on CPU)."""
  fwd = torch.compile(model) if compile else model
  opt_step = torch.compile(opt.step) if compile else opt.step

  def step(x, y, lr: Optional[float] = None):
    if lr is not None:
      for g in opt.param_groups:
        g["lr"] = lr
    logits = fwd(x)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt_step()
    return loss

  return step


def main(argv=None) -> None:
  """The PyTorch side of the whole-run benchmark: byte-level GPT on random windows of a
  text file, AdamW (warmup 100, cosine to 0.1x), clip 1.0 — what train.py runs for the same
  config. Prints the final loss and the wall time of the whole script."""
  import argparse
  import os
  import time
  t0 = time.perf_counter()
  ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
  ap.add_argument("--text", required=True)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--batch", type=int, default=12)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=260)  # gptjax's byte tokenizer: 256 + 4 specials
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(a.seed)
  ids = torch.frombuffer(bytearray(open(a.text, "rb").read()), dtype=torch.uint8).long()
  model = GPT(a.vocab, a.seq, a.width, a.depth, a.heads)
  opt = adamw(model, a.lr, 0.1)
  step = make_train_step(model, opt, 1.0)
  lr_at = warmup_cosine(a.lr, 100, a.steps, 0.1)
  gen = torch.Generator().manual_seed(a.seed)
  for i in range(a.steps):
    ix = torch.randint(len(ids) - a.seq - 1, (a.batch,), generator=gen)
    x = torch.stack([ids[j:j + a.seq] for j in ix])
    y = torch.stack([ids[j + 1:j + a.seq + 1] for j in ix])
    loss = step(x, y, lr=lr_at(i))
  print(f"loss {float(loss):.4f} wall {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
  main()
