"""How often a draw run's drawings show their prompt: single samples vs the model's own pick.

  python benchmarks/draw_best_of.py --workdir runs/multitask [--split test] [--prompts 200] \\
      [--best-of 1,4,8,16] [--cfg-scale 0,1.5]

For each guidance scale, every one of the first ``--prompts`` captions of the split is drawn
max(--best-of) times (``gptjax.train.evaluate_draw.draw_best_of``: one batch of samples and
the model's caption likelihood of each); for each K the first K samples of a prompt are the
candidates and the highest-scoring one is kept. The independent shapes analyser (NumPy
connected components) reads every drawing. Columns: the single-sample rate (all samples),
the rate of the kept drawings, and "any of K" (a right drawing was among the candidates:
what a perfect picker would reach). Only ``shapes`` runs (the analyser reads that grammar).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="test")
  p.add_argument("--prompts", type=int, default=200)
  p.add_argument("--best-of", type=_ints, default=[1, 4, 8, 16])
  p.add_argument("--cfg-scale", type=_floats, default=[0.0, 1.5])
  p.add_argument("--top-p", type=float, default=None, help="default: the run's draw.top_p")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not args.best_of or min(args.best_of) < 1:
    p.error(f"--best-of={args.best_of} is invalid: comma-separated positive integers")

  from gptjax.runs import load_model
  from gptjax.tasks import shapes_analyser as sa
  from gptjax.train.data import load_split
  from gptjax.train.draw_data import load_image_codes
  from gptjax.train.evaluate_draw import draw_best_of
  from gptjax.train.load import load_run_config, load_run_tokenizer

  c = load_run_config(args.workdir)
  if c.data.name != "shapes":
    p.error(f"the run trained on data.name={c.data.name!r}: the analyser reads 'shapes' only")
  model, codes = load_model(args.workdir), load_image_codes(args.workdir)
  tok = load_run_tokenizer(args.workdir, c)
  src = load_split(c, args.split)
  n = min(args.prompts, len(src))
  records = [src[i] for i in range(n)]
  text = lambda x: x.decode() if isinstance(x, bytes) else str(x)  # noqa: E731
  captions = [text(r[c.data.caption_key]) for r in records]
  k_max = max(args.best_of)
  print(f"{args.workdir}: {n} {args.split} prompts, up to {k_max} samples each, "
        f"temperature {c.draw.temperature}, top-k {c.draw.top_k or 'off'}, top-p "
        f"{args.top_p if args.top_p is not None else c.draw.get('top_p', 1.0)}")
  print("\n| guidance | K | single sample colour+count | kept colour+count | kept all "
        "| any of K colour+count | seconds |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for cfg in args.cfg_scale:
    t0 = time.perf_counter()
    _, cands, scores = draw_best_of(model, c, captions, codes, k_max, seed=args.seed,
                                    cfg_scale=cfg, top_p=args.top_p, tokenizer=tok)
    secs = time.perf_counter() - t0
    read = [[sa.matches(img, r) for img in per] for per, r in zip(cands, records)]
    ok = np.array([[m["colors"] and m["count"] for m in row] for row in read])
    every = np.array([[m["all"] for m in row] for row in read])
    for k in sorted(args.best_of):
      pick = (np.zeros(n, int) if scores is None or k == 1
              else scores[:, :k].argmax(axis=1))
      rows = np.arange(n)
      print(f"| {cfg:g} | {k} | {ok[:, :k].mean():.3f} | {ok[rows, pick].mean():.3f} | "
            f"{every[rows, pick].mean():.3f} | {ok[:, :k].any(axis=1).mean():.3f} | "
            f"{secs:.0f} (all K) |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
