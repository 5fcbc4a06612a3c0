"""The rule-based shapes analyser against the shapes builder's own drawing parameters."""
import numpy as np
import pytest

from gptjax.data.builders.shapes.shapes import (COLOR_NAMES, KINDS, PALETTE, caption_for,
                                                generate_example)
from gptjax.tasks import shapes_analyser as sa

N = 300


@pytest.fixture(scope="module")
def examples():
  return [generate_example(7, 0, i) for i in range(N)]


def _want(e):
  n = int(e["num_shapes"])
  return [(COLOR_NAMES[e["colors"][i]], KINDS[e["kinds"][i]]) for i in range(n)]


def test_analyser_recovers_drawing_parameters(examples):
  kinds_seen = set()
  for e in examples:
    blobs = sa.analyse(e["image"])
    n = int(e["num_shapes"])
    assert [(b.color, b.kind) for b in blobs] == _want(e), e["caption"]
    for i, b in enumerate(blobs):  # position and size too, from the box
      assert (b.x, b.y, b.radius) == (e["xs"][i], e["ys"][i], e["sizes"][i])
      kinds_seen.add(b.kind)
    assert sa.matches(e["image"], e) == dict(colors=True, count=True, kinds=True, order=True,
                                             all=True)
    assert sa.matches(e["image"], e["caption"])["all"]
    assert len(blobs) == n
  assert kinds_seen == set(KINDS)


def test_parse_caption_inverts_caption_for(examples):
  for e in examples:
    assert sa.parse_caption(e["caption"]) == _want(e)
    assert sa.parse_caption(e["caption"].encode()) == _want(e)
  # Every kind/colour combination, also with three shapes.
  for k in range(len(KINDS)):
    for c in range(len(COLOR_NAMES)):
      kinds, colors = [k, (k + 1) % 3, (k + 2) % 3], [c, (c + 1) % 6, (c + 5) % 6]
      want = [(COLOR_NAMES[ci], KINDS[ki]) for ki, ci in zip(kinds, colors)]
      assert sa.parse_caption(caption_for(kinds, colors)) == want
  for bad in ["a red", "a pink square", "a red square and", "two red squares", ""]:
    with pytest.raises(ValueError, match="caption"):
      sa.parse_caption(bad)


def _recolour(image, src, dst):
  out = image.copy()
  out[(image == PALETTE[src]).all(-1)] = PALETTE[dst]
  return out


def test_mismatches_are_reported(examples):
  e = next(e for e in examples if int(e["num_shapes"]) == 2 and e["colors"][0] != e["colors"][1])
  a, b = int(e["colors"][0]), int(e["colors"][1])
  swapped = _recolour(_recolour(_recolour(e["image"], a, 5 if a != 5 and b != 5 else 4), b, a),
                      5 if a != 5 and b != 5 else 4, b)  # a <-> b through a third colour
  m = sa.matches(swapped, e)
  # Same colour multiset and kinds, wrong assignment: only the order check sees it.
  assert m["colors"] and m["count"] and not m["order"] and not m["all"]
  extra = e["image"].copy()
  black = (extra == 0).all(-1)
  y, x = next((y, x) for y in range(28) for x in range(28) if black[y:y + 5, x:x + 5].all())
  extra[y:y + 4, x:x + 4] = PALETTE[2]  # a 16-pixel blue square where nothing is drawn
  assert len(sa.analyse(extra)) > len(sa.analyse(e["image"]))
  m = sa.matches(extra, e)
  assert not m["count"] and not m["all"]
  other = next(f for f in examples if sa.parse_caption(f["caption"]) != _want(e))
  assert not sa.matches(e["image"], other["caption"])["all"]


def test_specks_and_off_palette_noise_are_ignored(examples):
  rng = np.random.default_rng(0)
  for e in examples[:50]:
    img = e["image"].astype(np.int32)
    img += rng.integers(-40, 41, img.shape)  # colour noise within tolerance
    img = np.clip(img, 0, 255).astype(np.uint8)
    ys, xs = rng.integers(0, 32, 3), rng.integers(0, 32, 3)
    img[ys, xs] = PALETTE[rng.integers(0, 6, 3)]  # isolated specks < MIN_PIXELS
    m = sa.matches(img, e)
    assert m["all"], (e["caption"], sa.analyse(img))


def test_label_components_vs_scipy():
  ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(1)
  for _ in range(30):
    seg = rng.integers(0, 3, (16, 16)) * (rng.random((16, 16)) < 0.7)
    labels, n = sa.label_components(seg)
    ref_total = 0
    for v in (1, 2):  # scipy labels one value at a time (4-connectivity by default)
      ref, k = ndimage.label(seg == v)
      ref_total += k
      for r in range(1, k + 1):  # each scipy component is exactly one of ours
        ours = np.unique(labels[ref == r])
        assert len(ours) == 1 and ((labels == ours[0]) == (ref == r)).all()
    assert n == ref_total


def test_bad_inputs():
  with pytest.raises(ValueError, match="image shape"):
    sa.analyse(np.zeros((32, 32), np.uint8))
  with pytest.raises(ValueError, match="color"):
    sa.matches(np.zeros((32, 32, 3), np.uint8), [("pink", "square")])
  with pytest.raises(ValueError, match="record has keys"):
    sa.matches(np.zeros((32, 32, 3), np.uint8), {"foo": 1})
