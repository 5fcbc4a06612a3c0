"""Image<->text retrieval of a trained VLM on a split of its data, as a table.

  python -m gptjax.tasks.retrieve --workdir runs/demo_vlm [--split test]
      [--method generative|contrastive|both] [--limit N]

The gallery is the split's first ``--limit`` images (default: all) and their distinct
captions (``gptjax.tasks.retrieval``). Generative scoring costs images x captions decoder
rows: a whole 500-image split with ~400 distinct captions is ~200k rows, so ``--limit``
keeps a CPU run short. Exit status 2 with a one-line error for a bad workdir or option.

It loads the run through ``gptjax.runs`` (the entry-point floor), unlike the rest of
``gptjax.tasks``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from gptjax.runs import load_model
from gptjax.tasks.retrieval import KS, RULE, build_gallery, retrieval_metrics
from gptjax.train.data import load_split
from gptjax.train.load import load_run_config, load_run_tokenizer

CHOICES = ("generative", "contrastive", "both")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m gptjax.tasks.retrieve",
                              description="Image<->text retrieval recall@k of a trained VLM.")
  p.add_argument("--workdir", required=True, help="a train.py workdir")
  p.add_argument("--split", default="test", help="split of the run's data (default test)")
  p.add_argument("--method", default="generative", choices=CHOICES)
  p.add_argument("--limit", type=int, default=None,
                 help="gallery images: the split's first N (default all)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  return p


def format_table(results: dict) -> str:
  """One row per method: i2t and t2i recall@k in percent."""
  cols = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in KS]
  lines = [f"{'method':<12}" + "".join(f"{c:>10}" for c in cols)]
  for method, m in results.items():
    lines.append(f"{method:<12}" + "".join(
        f"{100 * m[f'{d}_r{k}']:>9.1f}%" for d in ("i2t", "t2i") for k in KS))
  return "\n".join(lines)


def _fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  if args.limit is not None and args.limit < 1:
    return _fail(f"--limit={args.limit} is invalid: must be a positive integer")
  workdir = os.path.expanduser(args.workdir)
  try:
    c = load_run_config(workdir)
    if c.data.task != "vqa" or c.model.get("vision") is None:
      return _fail(f"{workdir!r} trained data.task={c.data.task!r} without images: retrieval "
                   "needs a VLM trained on captioned vqa data")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      return _fail(f"{workdir!r} has no checkpoints/: train it first")
    model = load_model(workdir, step=args.step)
    tok = load_run_tokenizer(workdir, c)
    source = load_split(c, args.split)
    gallery = build_gallery(source, limit=args.limit, caption_key=c.data.caption_key,
                            image_key=c.data.image_key)
  except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
    return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  methods = ["generative", "contrastive"] if args.method == "both" else [args.method]
  if "contrastive" in methods and getattr(model, "contrastive", None) is None:
    return _fail(f"{workdir!r} has no contrastive head (model.contrastive_dim=0): use "
                 "--method generative")
  results, took = {}, {}
  for method in methods:
    t0 = time.perf_counter()
    results[method] = retrieval_metrics(model, gallery, method=method, tokenizer=tok)
    took[method] = time.perf_counter() - t0
  print(f"retrieval on {args.split!r} of {workdir}: {len(gallery.images)} images, "
        f"{len(gallery.texts)} distinct captions")
  print(format_table(results))
  print(f"hit rule: {RULE}")
  print("time: " + ", ".join(f"{m} {t:.1f}s" for m, t in took.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
