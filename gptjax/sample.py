"""Sample text from a trained or imported model.

  python -m gptjax.sample --workdir runs/lm --prompt "It was a dark" --num-samples 3
  python -m gptjax.sample --workdir path/to/hf_gpt2 --prompt "Hello" --temperature 0.8 --top-k 40

``--workdir`` is any of: a ``train.py`` workdir (``config.json`` + ``checkpoints/``; the
tokenizer saved with the run), a gptjax model directory written by ``python -m
gptjax.interop.hf_gpt2 import`` (``model_config.json`` + ``params/``, tokenizer in
``tokenizer/``), or a Hugging Face GPT-2 directory (``config.json`` with
``model_type: gpt2``, its ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``).
"""
from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

from gptjax.generate import generate
from gptjax.interop.pretrained import load_pretrained


def load(workdir: str):
  """(model, tokenizer) of a workdir / model directory (see the module docstring)."""
  return load_pretrained(workdir)


def sample(model, tokenizer, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
           num_samples: int = 1) -> list[str]:
  """``num_samples`` continuations of ``prompt`` (each decoded up to the first end-of-text).
  An empty prompt starts at a document boundary (the end-of-text id)."""
  ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  tokens = np.tile(np.asarray([ids], np.int32), (num_samples, 1))
  out = generate(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, stop_token=tokenizer.eos_id)
  return [tokenizer.decode(row) for row in np.asarray(out)]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m gptjax.sample", description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="train.py workdir or model directory")
  ap.add_argument("--prompt", default="", help="text to continue ('' = a new document)")
  ap.add_argument("--max-new-tokens", type=int, default=200)
  ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  ap.add_argument("--top-k", type=int, default=None)
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num-samples", type=int, default=1)
  args = ap.parse_args(argv)
  if args.num_samples < 1:
    ap.error(f"--num-samples must be >= 1, got {args.num_samples}")
  model, tok = load(args.workdir)
  try:
    texts = sample(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, num_samples=args.num_samples)
  except ValueError as e:  # e.g. --top-k beyond the vocabulary, a prompt past the positions
    ap.error(str(e))
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f"--- sample {i + 1}/{len(texts)} ---")
    print(args.prompt + text, flush=True)


if __name__ == "__main__":
  main()
