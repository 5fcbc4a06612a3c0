"""python -m gptjax.data.tokenizers train --kind bpe|spm --vocab N FILES... --out DIR"""
import argparse
import time

from gptjax.data.builders.text_files.text_files import resolve_paths
from gptjax.data.tokenizers import KINDS, save_tokenizer, train


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m gptjax.data.tokenizers",
                               description="Train a tokenizer on your own text, offline.")
  sub = ap.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train", help="train a BPE or SentencePiece tokenizer")
  t.add_argument("--kind", choices=KINDS, default="bpe")
  t.add_argument("--vocab", type=int, default=8192, help="vocabulary size (ids)")
  t.add_argument("--out", required=True, help="directory to write the tokenizer into")
  t.add_argument("files", nargs="+", help="text files, globs or directories")
  args = ap.parse_args(argv)
  files = resolve_paths(args.files)
  t0 = time.perf_counter()
  tok = train(args.kind, files, args.vocab)
  path = save_tokenizer(tok, args.out)
  print(f"{args.kind} tokenizer, {tok.vocab_size} ids, trained on {len(files)} files in "
        f"{time.perf_counter() - t0:.1f} s: {path}")


if __name__ == "__main__":
  main()
