"""Image<->text retrieval: recall@k from a score matrix, and the gallery of a captioned split.

The gallery of a split: its images (N, in stored order, optionally the first ``limit``) and
their *distinct* captions (M <= N; ``shapes`` repeats captions often, e.g. every image of a
lone red square is "a red square"). Image -> text ranks the M captions for each image; a
caption is a hit when its text equals the image's own caption (exactly one hit). Text ->
image ranks the N images for each distinct caption; every image whose caption equals the
query text is a hit. Listing a caption once avoids galleries in which copies of one text tie
with each other.

Ties (equal scores, e.g. a model that cannot tell two captions apart) count against the
query: a query succeeds at k when fewer than k non-hits score >= its best-scoring hit.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from gptjax.data.pipeline import tasks_per_record
from gptjax.tasks.match import METHODS, match

KS = (1, 5, 10)
RULE = ("hit = the caption text equals the image's own caption; i2t ranks the distinct "
        "captions for each image, t2i ranks the images for each distinct caption (any image "
        "with that caption is a hit); ties count against the query")


def _success(scores: np.ndarray, hits: np.ndarray, ks: Sequence[int], what: str) -> dict:
  """Per-row queries: fraction whose best hit has fewer than k non-hits at or above it."""
  if not hits.any(axis=1).all():
    bad = int(np.flatnonzero(~hits.any(axis=1))[0])
    raise ValueError(f"hit_matrix has no hit for {what} query {bad}: every query needs at "
                     "least one hit")
  best = np.where(hits, scores, -np.inf).max(axis=1, keepdims=True)
  ahead = np.sum(~hits & (scores >= best), axis=1)  # non-hits ranked before the best hit
  return {k: float(np.mean(ahead < k)) for k in ks}


def recall_at_k(scores, hit_matrix, ks: Sequence[int] = KS) -> dict:
  """Recall@k both ways of a (N_img, N_txt) ``scores`` matrix (higher = better match).

  ``hit_matrix[i, j]`` (bool) says whether text j counts as a hit for image i (and so image
  i for text j). Image -> text: each row is a query; text -> image: each column. Returns
  ``{'i2t_r1': ..., 't2i_r1': ..., ...}`` for every k in ``ks`` (fractions in [0, 1]).
  """
  scores = np.asarray(scores, np.float64)
  hits = np.asarray(hit_matrix, bool)
  if scores.ndim != 2 or hits.shape != scores.shape:
    raise ValueError(f"scores shape {scores.shape} and hit_matrix shape {hits.shape} are "
                     "invalid: expected the same (N_img, N_txt)")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN: a NaN never ranks, fix the scorer")
  ks = tuple(ks)
  if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
    raise ValueError(f"ks={ks!r} is invalid: expected positive integers")
  out = {}
  for name, (s, h) in (("i2t", (scores, hits)), ("t2i", (scores.T, hits.T))):
    for k, v in _success(s, h, ks, name).items():
      out[f"{name}_r{k}"] = v
  return out


@dataclasses.dataclass
class Gallery:
  """A split's retrieval gallery (see the module doc)."""
  images: np.ndarray  # (N, H, W, C) uint8
  captions: list[str]  # (N,) each image's own caption
  texts: list[str]  # (M,) the distinct captions, in first-seen order

  @property
  def hits(self) -> np.ndarray:
    """(N, M) bool: text j is image i's caption."""
    return np.asarray(self.captions)[:, None] == np.asarray(self.texts)[None, :]


def build_gallery(source, *, limit: Optional[int] = None, caption_key: str = "caption",
                  image_key: str = "image") -> Gallery:
  """The gallery of ``source`` (a random-access split of image + caption records, e.g.
  ``gptjax.train.data.load_split``): its first ``limit`` records (default all)."""
  n = len(source) if limit is None else min(int(limit), len(source))
  if n < 1:
    raise ValueError(f"limit={limit!r} leaves an empty gallery (the split has "
                     f"{len(source)} records): expected a positive limit or None")
  images, captions = [], []
  for i in range(n):
    record = source[i]
    if image_key not in record:
      raise ValueError(f"record {i} has no {image_key!r}: retrieval needs images "
                       f"(data.image_key); keys are {sorted(record)}")
    cap = [ex for ex in tasks_per_record(record, caption_key=caption_key, image_key=image_key)
           if ex.kind == "caption"]
    if not cap:
      raise ValueError(f"record {i} has no caption {caption_key!r} (data.caption_key): "
                       f"retrieval needs captioned images; keys are {sorted(record)}")
    images.append(np.asarray(record[image_key]))
    captions.append(cap[0].target)
  texts = list(dict.fromkeys(captions))
  return Gallery(np.stack(images), captions, texts)


def retrieval_metrics(model, gallery: Gallery, *, method: str = "generative",
                      tokenizer=None, ks: Sequence[int] = KS) -> dict:
  """Recall@k both ways of ``model`` on ``gallery`` with ``method`` ('generative' |
  'contrastive', see ``gptjax.tasks.match``), plus ``gallery_size`` (images),
  ``distinct_captions``, ``method`` and the hit ``rule`` (strings)."""
  if method not in METHODS:
    raise ValueError(f"method={method!r} is invalid: allowed values are "
                     f"{', '.join(map(repr, METHODS))}")
  scores = match(model, gallery.images, gallery.texts, method=method, tokenizer=tokenizer)
  out: dict = recall_at_k(scores, gallery.hits, ks)
  out.update(gallery_size=len(gallery.images), distinct_captions=len(gallery.texts),
             method=method, rule=RULE)
  return out
