"""Caption metrics as the COCO caption evaluation computes them: corpus BLEU-4 and CIDEr-D.

A transcription of the ``Bleu`` and ``Cider`` scorers of pycocoevalcap 1.2 (coco-caption,
github.com/tylin/coco-caption), including their quirks, checked against pycocoevalcap
itself in tests/test_image_text.py. Why not depend on it: it is ~200 lines of pure Python,
yet installs pycocotools (a compiled extension) and its METEOR / SPICE / tokenizer need
Java; every captioning eval should get these numbers from a core install.

- ``bleu4``: corpus BLEU (Papineni et al. 2002): clipped n-gram counts (n = 1..4, each
  clipped by its largest count in any one reference) summed over the corpus, geometric mean
  of the precisions, brevity penalty ``exp(1 - r/c)`` when the candidate length ``c`` is
  below ``r``, the sum over images of the reference length closest to the candidate's
  (ties: the shorter). coco-caption's smoothing constants (1e-15 / 1e-9) are kept, so a
  corpus with no 4-gram match scores ~0, not an error.
- ``cider``: CIDEr-D (Vedantam et al. 2015): per n (1..4) tf-idf vectors, idf from the
  document frequency of each n-gram among the evaluated set's reference SETS
  (``log(num images) - log(max(1, df))``), the candidate's weights clipped at the
  reference's, cosine-normalised, times a Gaussian length penalty (sigma 6), averaged over
  n and references, x10, averaged over images. coco-caption measures the length in the
  penalty in bigrams (words - 1), kept here; only the difference of two lengths enters, so
  that equals counting words. A one-image set scores 0 (every idf is 0): CIDEr needs a set
  of images.

Tokenisation (``tokenize``, applied to predictions and references alike): lowercase, every
character that is neither a word character nor whitespace replaced by a space, split on
whitespace. This is NOT coco-caption's Java PTB tokenizer (which splits clitics such as
"'s" and drops punctuation tokens), so scores are comparable between gptjax runs but can
differ slightly from published COCO numbers.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

N = 4
SIGMA = 6.0
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's BLEU smoothing
_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
  """Lowercased words of ``text`` with punctuation removed (see the module docstring)."""
  return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str]) -> Counter:
  return Counter(tuple(words[i:i + k]) for k in range(1, N + 1)
                 for i in range(len(words) - k + 1))


def _check(predictions, references) -> None:
  if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
    raise ValueError("predictions must be a list of strings (one caption per image)")
  if len(predictions) != len(references):
    raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) "
                     "must have the same length: one entry per image")
  if not predictions:
    raise ValueError("predictions is empty: a caption metric needs at least one image")
  for i, refs in enumerate(references):
    if (isinstance(refs, str) or not len(refs) or not all(isinstance(r, str) for r in refs)):
      raise ValueError(f"references[{i}]={refs!r} is invalid: each entry must be a non-empty "
                       "list of reference strings")


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus BLEU-4 in [0, 1] of ``predictions[i]`` against ``references[i]`` (a list)."""
  _check(predictions, references)
  testlen = reflen = 0
  guess, correct = [0] * N, [0] * N
  for pred, refs in zip(predictions, references):
    words = tokenize(pred)
    ref_words = [tokenize(r) for r in refs]
    maxref: Counter = Counter()
    for r in ref_words:
      maxref |= _ngrams(r)  # union of Counters: the elementwise max
    testlen += len(words)
    reflen += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    for k in range(N):
      guess[k] += max(0, len(words) - k)
    for g, count in _ngrams(words).items():
      correct[len(g) - 1] += min(count, maxref[g])
  precision = 1.0
  for k in range(N):
    precision *= (correct[k] + _TINY) / (guess[k] + _SMALL)
  score = precision ** (1.0 / N)
  ratio = (testlen + _TINY) / (reflen + _SMALL)
  if ratio < 1:
    score *= math.exp(1 - 1 / ratio)
  return float(score)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]],
          sigma: float = SIGMA) -> float:
  """CIDEr-D (coco-caption's "CIDEr"; 0 to ~10, x10 scale) of the set of predictions."""
  _check(predictions, references)
  tests = [_ngrams(tokenize(p)) for p in predictions]
  refs = [[_ngrams(tokenize(r)) for r in rs] for rs in references]
  df: Counter = Counter()
  for rs in refs:
    df.update(set().union(*(r.keys() for r in rs)))
  log_images = math.log(len(refs))

  def vectors(counts: Counter):
    vec = [dict() for _ in range(N)]
    norm = [0.0] * N
    length = 0
    for g, tf in counts.items():
      n = len(g) - 1
      w = tf * (log_images - math.log(max(1.0, df[g])))
      vec[n][g] = w
      norm[n] += w * w
      if n == 1:  # coco-caption's length: the bigram count (see the module docstring)
        length += tf
    return vec, [math.sqrt(x) for x in norm], length

  scores = []
  for test, rs in zip(tests, refs):
    vec, norm, length = vectors(test)
    total = [0.0] * N
    for r in rs:
      vec_r, norm_r, length_r = vectors(r)
      penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
      for n in range(N):
        val = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec[n].items())
        if norm[n] != 0 and norm_r[n] != 0:
          val /= norm[n] * norm_r[n]
        total[n] += val * penalty
    scores.append(sum(total) / N / len(rs) * 10.0)
  return float(sum(scores) / len(scores))


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
  """``exact_match`` (fraction of predictions equal, as raw strings, to one of their
  references — with one reference each this is ``decode_accuracy``'s caption exact match),
  ``bleu4`` and ``cider`` over the whole set (corpus metrics: score all images at once, not
  batches or processes separately)."""
  _check(predictions, references)
  exact = sum(p in refs for p, refs in zip(predictions, references)) / len(predictions)
  return {"exact_match": float(exact), "bleu4": bleu4(predictions, references),
          "cider": cider(predictions, references)}
