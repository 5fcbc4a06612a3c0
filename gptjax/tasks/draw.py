"""Draw with a trained decoder: a caption -> a PNG grid of N sampled images.

  python -m gptjax.tasks.draw --workdir runs/multitask "a red circle and a blue square" \\
      [--n 8] [--best-of K] [--temperature T] [--top-k K] [--top-p P] [--cfg-scale S] \\
      [--seed 0] [--scale 4] --out out.png

The workdir must come from a run with ``config.draw.enabled=True`` (its decoder knows the
image codes and ``<workdir>/image_codes/`` holds the tokenizer that turns them into
pixels). The sampling options default to the run's ``draw`` config. ``--top-k 0``: sample
among all codes; ``--top-p 1``: no nucleus cut; ``--cfg-scale 0``: no classifier-free
guidance (s > 0 samples from uncond + s * (cond - uncond); 1 is the plain conditional);
``--best-of K``: each of the N drawings is the one of K samples that the model itself scores
highest as the prompt's image (its caption likelihood), N * K samples in all (1: plain
samples).
The grid has min(N, 4) columns, each sample enlarged ``--scale`` times (nearest
neighbour). For each sample the independent shapes analyser's reading is printed (the
blobs it finds, and for a caption in the shapes grammar whether colours / count / kinds /
order match). Exit status 2 with a one-line error for a bad workdir or option.

It loads the run through ``gptjax.runs`` (the entry-point floor); the library part of the
task is ``gptjax.tasks.drawing``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from gptjax.runs import load_model
from gptjax.tasks import shapes_analyser as sa
from gptjax.train.draw_data import CODES_DIR, load_image_codes
from gptjax.train.evaluate_draw import draw_best_of
from gptjax.train.load import load_run_config, load_run_tokenizer


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m gptjax.tasks.draw",
                              description="Sample images of a caption from a draw run.")
  p.add_argument("prompt", help="the caption to draw, e.g. 'a red circle and a blue square'")
  p.add_argument("--workdir", required=True, help="a train.py workdir of a draw run")
  p.add_argument("--out", required=True, help="the PNG grid to write")
  p.add_argument("--n", type=int, default=8, help="samples (default 8)")
  p.add_argument("--best-of", type=int, default=None,
                 help="samples per drawing, the model's best kept (default: the run's "
                      "draw.best_of; 1: plain samples)")
  p.add_argument("--temperature", type=float, default=None,
                 help="default: the run's draw.temperature")
  p.add_argument("--top-k", type=int, default=None,
                 help="0: all codes (default: the run's draw.top_k)")
  p.add_argument("--top-p", type=float, default=None,
                 help="nucleus sampling, 1: off (default: the run's draw.top_p)")
  p.add_argument("--cfg-scale", type=float, default=None,
                 help="0: no guidance (default: the run's draw.cfg_scale)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--scale", type=int, default=4, help="pixels per image pixel in the PNG")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  return p


def grid_image(images: np.ndarray, scale: int = 4, cols: int = 4) -> np.ndarray:
  """uint8 (N, H, W, C) -> one (rows*H*scale, cols*W*scale, C) image, row-major, black
  where the last row is short; ``cols`` = min(N, cols)."""
  n, h, w, ch = images.shape
  cols = min(n, cols)
  rows = math.ceil(n / cols)
  big = images.repeat(scale, axis=1).repeat(scale, axis=2)
  out = np.zeros((rows * h * scale, cols * w * scale, ch), np.uint8)
  for i, img in enumerate(big):
    r, col = divmod(i, cols)
    out[r * h * scale:(r + 1) * h * scale, col * w * scale:(col + 1) * w * scale] = img
  return out


def reading(image: np.ndarray, prompt: str) -> str:
  """The analyser's reading of one drawing: its blobs left to right, and the match with
  ``prompt`` when the prompt is a shapes caption."""
  blobs = sa.analyse(image)
  found = ", ".join(f"{b.color} {b.kind}" for b in blobs) or "nothing"
  try:
    m = sa.matches(image, prompt)
  except ValueError:  # not in the shapes caption grammar: nothing to compare with
    return f"sees: {found}"
  return f"sees: {found} | " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.items())


def _fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  unset_or = lambda v, ok: v is None or ok(v)  # noqa: E731
  for name, ok, allowed in (("--n", args.n >= 1, "a positive integer"),
                            ("--best-of", unset_or(args.best_of, lambda v: v >= 1),
                             "a positive integer (1: plain samples)"),
                            ("--temperature", unset_or(args.temperature, lambda v: v >= 0),
                             ">= 0 (0: greedy)"),
                            ("--top-k", unset_or(args.top_k, lambda v: v >= 0),
                             ">= 0 (0: all codes)"),
                            ("--top-p", unset_or(args.top_p, lambda v: 0 < v <= 1),
                             "in (0, 1] (1: off)"),
                            ("--cfg-scale", unset_or(args.cfg_scale, lambda v: v >= 0),
                             ">= 0 (0: no guidance)"),
                            ("--scale", args.scale >= 1, "a positive integer")):
    if not ok:
      return _fail(f"{name}={getattr(args, name[2:].replace('-', '_'))} is invalid: must be "
                   f"{allowed}")
  if not args.out.lower().endswith(".png"):
    return _fail(f"--out={args.out!r} is invalid: must be a .png path")
  workdir = os.path.expanduser(args.workdir)
  try:
    c = load_run_config(workdir)
    if c.get("draw") is None or not c.draw.enabled:
      return _fail(f"{workdir!r} was trained without drawing (config.draw.enabled=False): "
                   "train with --config.draw.enabled=True")
    if not os.path.isdir(os.path.join(workdir, CODES_DIR)):
      return _fail(f"{workdir!r} has no {CODES_DIR}/ (the image tokenizer): train it first")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      return _fail(f"{workdir!r} has no checkpoints/: train it first")
    codes_model = load_image_codes(workdir)
    model = load_model(workdir, step=args.step)
    tok = load_run_tokenizer(workdir, c)
    best_of = args.best_of or int(c.draw.get("best_of", 1))
    images = draw_best_of(model, c, [args.prompt] * args.n, codes_model, best_of,
                          seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, cfg_scale=args.cfg_scale, tokenizer=tok,
                          batch_size=min(args.n * best_of, 256)).images
  except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
    return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  from PIL import Image
  out = os.path.abspath(os.path.expanduser(args.out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  grid = grid_image(images, args.scale)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out)
  picked = f" (each the model's pick of {best_of} samples)" if best_of > 1 else ""
  print(f"{args.n} drawings of {args.prompt!r}{picked} -> {out}")
  for i, img in enumerate(images):
    print(f"  {i}: {reading(img, args.prompt)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
