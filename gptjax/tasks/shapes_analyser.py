"""A rule-based (no neural network) reader of shapes-like images, for judging drawn images.

``analyse(image)``: each pixel gets its nearest palette colour (black = background; farther
than ``tolerance`` from every colour = noise), pixels of one colour are grouped into
4-connected blobs, blobs under ``min_pixels`` are dropped (specks in generated images), and
each blob gets a kind from its shape. ``matches(image, record_or_caption)`` compares what is
drawn with what a prompt asked for. ``parse_caption`` inverts ``shapes.caption_for``.

Kind rule, from the renders of ``shapes.shape_mask`` (half-extent r = 3..6, box 2r+1 wide):
a square fills its box (fill 1.0), a circle fills 0.59-0.67 of it and is symmetric top to
bottom, the up-pointing triangle fills ~0.51 with ~3.4x more pixels in its bottom half than
in its top half. Fill alone separates circle and triangle by only ~0.08, so the top/bottom
asymmetry decides between them (0 for a circle, ~0.5 for a triangle). (Template matching
against rendered masks was tried too: no better on a tokenizer's blurry reconstructions,
and 3x slower.)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Union

import numpy as np

from gptjax.data.builders.shapes.shapes import COLOR_NAMES, KINDS, PALETTE

# Black first: colour index 0 is the background, 1 + i is COLOR_NAMES[i].
FULL_PALETTE = np.concatenate([np.zeros((1, 3), np.uint8), PALETTE]).astype(np.uint8)
# Euclidean RGB distance; the closest two palette colours are 255 apart (red/yellow,
# yellow/white, black/blue), so ~100 accepts a colour only when it is clearly that colour.
TOLERANCE = 100.0
MIN_PIXELS = 10  # the smallest real shape (a triangle of r=3) has 25 pixels
SQUARE_FILL = 0.85  # squares fill 1.0 of their box, circles <= 0.67
TRIANGLE_ASYMMETRY = 0.25  # (bottom - top) / (bottom + top): circle 0, triangle ~0.5


@dataclasses.dataclass(frozen=True)
class Blob:
  """One connected region of one colour. ``bbox`` = (x0, y0, x1, y1), inclusive pixels;
  ``x``, ``y``, ``radius`` are the box centre and half-extent (exact for real renders)."""
  color: str
  kind: str
  pixels: int
  centroid: tuple[float, float]  # (x, y): column, row
  bbox: tuple[int, int, int, int]
  fill: float
  asymmetry: float

  @property
  def x(self) -> float:
    return (self.bbox[0] + self.bbox[2]) / 2

  @property
  def y(self) -> float:
    return (self.bbox[1] + self.bbox[3]) / 2

  @property
  def radius(self) -> float:
    return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]) / 2


def nearest_colour(images, palette: np.ndarray = FULL_PALETTE) -> tuple[np.ndarray, np.ndarray]:
  """(..., 3) pixels -> (index of the nearest palette colour (...), its distance (...))."""
  x = np.asarray(images, np.float32)
  pal = np.asarray(palette, np.float32)
  if x.shape[-1] != pal.shape[-1]:
    raise ValueError(f"images have {x.shape[-1]} channels, the palette {pal.shape[-1]}")
  best = np.zeros(x.shape[:-1], np.int32)
  dist = np.full(x.shape[:-1], np.inf, np.float32)
  for i, c in enumerate(pal):  # one colour at a time: memory stays ~ one image batch
    d = ((x - c) ** 2).sum(-1)
    closer = d < dist
    best[closer], dist[closer] = i, d[closer]
  return best, np.sqrt(dist)


def segment(image, tolerance: float = TOLERANCE) -> np.ndarray:
  """(H, W, 3) -> (H, W) int: 0 background, 1 + i for COLOR_NAMES[i], -1 for noise."""
  idx, dist = nearest_colour(image)
  return np.where(dist <= tolerance, idx, -1).astype(np.int32)


def label_components(seg: np.ndarray) -> tuple[np.ndarray, int]:
  """4-connected regions of equal positive value in an int (H, W) map -> (labels 1..n,
  0 where ``seg <= 0``; n). A boolean mask works too (one region per blob of True).

  Min-label propagation: every pixel starts with its own id and repeatedly takes the
  smallest id among itself and its same-valued neighbours until nothing changes (at most
  the longest path inside a region: a few dozen rounds at 32 x 32).
  """
  seg = np.asarray(seg).astype(np.int64)
  inside = seg > 0
  big = np.iinfo(np.int64).max
  lab = np.where(inside, np.arange(seg.size).reshape(seg.shape), big)
  ps = np.pad(seg, 1, constant_values=0)
  # Which of the four neighbours is the same region; fixed across rounds.
  same = [ps[:-2, 1:-1] == seg, ps[2:, 1:-1] == seg, ps[1:-1, :-2] == seg, ps[1:-1, 2:] == seg]
  same = [m & inside for m in same]
  while True:
    p = np.pad(lab, 1, constant_values=big)
    nbs = (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:])
    new = lab
    for m, nb in zip(same, nbs):
      new = np.where(m, np.minimum(new, nb), new)
    if np.array_equal(new, lab):
      break
    lab = new
  roots = np.unique(lab[inside])
  out = np.zeros(seg.shape, np.int32)
  out[inside] = np.searchsorted(roots, lab[inside]) + 1
  return out, len(roots)


def _kind(fill: float, asymmetry: float) -> str:
  if fill >= SQUARE_FILL:
    return "square"
  return "triangle" if asymmetry > TRIANGLE_ASYMMETRY else "circle"


def analyse(image, *, tolerance: float = TOLERANCE, min_pixels: int = MIN_PIXELS) -> list[Blob]:
  """The blobs of one (S, S, 3) image, left to right (by centroid column)."""
  x = np.asarray(image)
  if x.ndim != 3 or x.shape[-1] != 3 or x.shape[0] != x.shape[1]:
    raise ValueError(f"image shape {x.shape} is invalid: expected a square (S, S, 3) image")
  seg = segment(x, tolerance)
  labels, n = label_components(seg)
  blobs = []
  for k in range(1, n + 1):
    rows, cols = np.nonzero(labels == k)
    if len(rows) < min_pixels:
      continue
    c = int(seg[rows[0], cols[0]])
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    mid = (y0 + y1) / 2
    top, bottom = int((rows < mid).sum()), int((rows > mid).sum())
    fill = len(rows) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    asym = (bottom - top) / max(bottom + top, 1)
    blobs.append(Blob(COLOR_NAMES[c - 1], _kind(fill, asym), len(rows),
                      (float(cols.mean()), float(rows.mean())),
                      (int(x0), int(y0), int(x1), int(y1)), float(fill), float(asym)))
  return sorted(blobs, key=lambda b: b.centroid[0])


_PART = re.compile(rf"a ({'|'.join(COLOR_NAMES)}) ({'|'.join(KINDS)})")


def parse_caption(text: Union[str, bytes]) -> list[tuple[str, str]]:
  """"a red square, a blue circle and a green triangle" -> [(color, kind), ...] left to
  right: the inverse of ``shapes.caption_for``."""
  s = text.decode("utf-8") if isinstance(text, bytes) else str(text)
  head, sep, last = s.rpartition(" and ")
  parts = (head.split(", ") + [last]) if sep else [s]
  out = []
  for p in parts:
    m = _PART.fullmatch(p)
    if m is None:
      raise ValueError(f"caption {s!r} is invalid: part {p!r} is not 'a <color> <kind>' "
                       f"with color in {COLOR_NAMES} and kind in {KINDS}")
    out.append((m.group(1), m.group(2)))
  return out


Intended = Union[str, bytes, dict, Sequence[tuple[str, str]]]


def intended_shapes(record_or_caption: Intended) -> list[tuple[str, str]]:
  """What a prompt asks for, left to right, from a shapes record (its drawing parameters
  ``num_shapes`` / ``kinds`` / ``colors``, else its ``caption``), a caption, or a list of
  (color, kind) pairs."""
  r = record_or_caption
  if isinstance(r, (str, bytes)):
    return parse_caption(r)
  if isinstance(r, dict):
    if all(k in r for k in ("num_shapes", "kinds", "colors")):
      n = int(r["num_shapes"])
      return [(COLOR_NAMES[int(c)], KINDS[int(k)])
              for k, c in zip(np.asarray(r["kinds"])[:n], np.asarray(r["colors"])[:n])]
    if "caption" in r:
      return parse_caption(r["caption"])
    raise ValueError(f"record has keys {sorted(r)}: expected num_shapes/kinds/colors or caption")
  pairs = [tuple(p) for p in r]
  for c, k in pairs:
    if c not in COLOR_NAMES or k not in KINDS:
      raise ValueError(f"shape ({c!r}, {k!r}) is invalid: color must be in {COLOR_NAMES}, "
                       f"kind in {KINDS}")
  return pairs


def matches(image, record_or_caption: Intended, **analyse_kw) -> dict[str, bool]:
  """Does ``image`` show what was asked? ``colors`` / ``kinds``: the same multisets;
  ``count``: as many blobs as shapes; ``order``: the same (color, kind) sequence left to
  right; ``all``: every one of them."""
  want = intended_shapes(record_or_caption)
  got = [(b.color, b.kind) for b in analyse(image, **analyse_kw)]
  out = {
      "colors": sorted(c for c, _ in got) == sorted(c for c, _ in want),
      "count": len(got) == len(want),
      "kinds": sorted(k for _, k in got) == sorted(k for _, k in want),
      "order": got == want,
  }
  out["all"] = all(out.values())
  return out
