"""Built-in TFDS builders (shapes, text_files) and load_source, all without TensorFlow.

Answers, captions and pixels are checked against small functions written here from the
dataset's spec (kind/colour encoding, wording, geometry), not against the builder's code.
"""
import os
import re

import numpy as np
import pytest

from gptjax.data.builders import load_shapes, load_text_files
from gptjax.data.datasets import load_source

# The encoding the dataset promises (index -> name / RGB).
KINDS = ["square", "circle", "triangle"]
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "purple": (160, 32, 240),
}
COLOR_NAMES = list(COLORS)
SIZES = dict(train_size=60, validation_size=30, test_size=200)
SPLITS = ("train", "validation", "test")


def _records(source):
  return [source[i] for i in range(len(source))]


def _s(x):
  return x.decode("utf-8") if isinstance(x, bytes) else x


@pytest.fixture(scope="module")
def shapes_a(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes_a")
  return {s: _records(load_shapes(s, data_dir=d, **SIZES)) for s in SPLITS}


@pytest.fixture(scope="module")
def shapes_b(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes_b")
  return {s: _records(load_shapes(s, data_dir=d, **SIZES)) for s in SPLITS}


# ------------------------------------------------------------------------- shapes ---


def test_shapes_deterministic_across_builds(shapes_a, shapes_b):
  for split in SPLITS:
    assert len(shapes_a[split]) == len(shapes_b[split])
    for ra, rb in zip(shapes_a[split], shapes_b[split]):
      assert ra["image"].dtype == np.uint8
      assert ra["image"].tobytes() == rb["image"].tobytes()
      assert ra["caption"] == rb["caption"]
      assert list(ra["questions"]) == list(rb["questions"])
      assert list(ra["answers"]) == list(rb["answers"])


def test_shapes_split_sizes_and_splits_differ(shapes_a, tmp_path):
  for split in SPLITS:
    assert len(shapes_a[split]) == SIZES[f"{split}_size"]
    assert shapes_a[split][0]["image"].shape == (32, 32, 3)
  images = {s: {r["image"].tobytes() for r in shapes_a[s]} for s in SPLITS}
  assert not images["train"] & images["validation"]
  assert not images["train"] & images["test"]
  assert not images["validation"] & images["test"]
  # Another seed gives other data.
  other = _records(load_shapes("validation", data_dir=tmp_path, seed=1, **SIZES))
  assert not images["validation"] & {r["image"].tobytes() for r in other}


def _spec(r):
  """(kind name, colour name, x, y, r) per shape, from the stored drawing parameters."""
  n = int(r["num_shapes"])
  assert 1 <= n <= 3
  for key in ("kinds", "colors", "xs", "ys", "sizes"):
    assert np.all(np.asarray(r[key])[n:] == -1), key
  return [
      (KINDS[r["kinds"][i]], COLOR_NAMES[r["colors"][i]], int(r["xs"][i]), int(r["ys"][i]), int(r["sizes"][i]))
      for i in range(n)
  ]


def _expected_caption(shapes):
  parts = [f"a {c} {k}" for k, c, *_ in sorted(shapes, key=lambda s: s[2])]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _expected_answer(question, shapes):
  """(question type, answer) recomputed from the shapes; fails on an unaskable question."""
  by_kind = {k: [s for s in shapes if s[0] == k] for k in KINDS}
  if m := re.fullmatch(r"what color is the (\w+)\?", question):
    (only,) = by_kind[m[1]]  # asked only about a kind present exactly once
    return "color", only[1]
  if m := re.fullmatch(r"how many (\w+)s\?", question):
    return "count", str(len(by_kind[m[1]]))
  if m := re.fullmatch(r"is the (\w+) left of the (\w+)\?", question):
    assert m[1] != m[2]
    (a,), (b,) = by_kind[m[1]], by_kind[m[2]]
    return "spatial", "yes" if a[2] < b[2] else "no"
  raise AssertionError(f"unexpected question {question!r}")


def test_shapes_captions_and_answers_recomputed(shapes_a):
  seen_types = set()
  for r in shapes_a["test"]:
    shapes = _spec(r)
    assert len({x for _, _, x, _, _ in shapes}) == len(shapes), "centre columns must differ"
    assert _s(r["caption"]) == _expected_caption(shapes)
    questions = [_s(q) for q in r["questions"]]
    answers = [_s(a) for a in r["answers"]]
    assert len(questions) == len(answers) == 3
    assert len(set(questions)) == 3
    for q, a, t in zip(questions, answers, r["question_types"]):
      qtype, expected = _expected_answer(q, shapes)
      assert a == expected, (q, shapes)
      assert ["color", "count", "spatial"][int(t)] == qtype
      assert re.fullmatch(r"[a-z0-9]+", a)
      seen_types.add(qtype)
  assert seen_types == {"color", "count", "spatial"}


def test_shapes_pixels_match_parameters(shapes_a):
  black = np.zeros(3, np.uint8)
  for r in shapes_a["test"]:
    img = r["image"]
    shapes = _spec(r)
    covered = np.zeros(img.shape[:2], bool)
    for kind, color, x, y, s in shapes:
      rgb = np.array(COLORS[color], np.uint8)
      # The shape's box is inside the image and no other shape's box touches it.
      assert 0 <= x - s and x + s < img.shape[1] and 0 <= y - s and y + s < img.shape[0]
      box = (slice(y - s, y + s + 1), slice(x - s, x + s + 1))
      assert not covered[box].any(), "shapes overlap"
      covered[box] = True
      # Centre pixel has the shape's colour; inside the box only that colour or background.
      np.testing.assert_array_equal(img[y, x], rgb)
      patch = img[box].reshape(-1, 3)
      assert np.all(np.all(patch == rgb, -1) | np.all(patch == black, -1))
      # Probes that tell the kinds apart.
      on = lambda px, py: np.array_equal(img[py, px], rgb)
      if kind == "square":
        assert all(on(x + dx, y + dy) for dx in (-s, s) for dy in (-s, s))
      elif kind == "circle":
        assert on(x - s, y) and on(x + s, y) and on(x, y - s) and on(x, y + s)
        assert not any(on(x + dx, y + dy) for dx in (-s, s) for dy in (-s, s))
      else:  # triangle pointing up
        assert on(x, y - s) and on(x - s, y + s) and on(x + s, y + s)
        assert not on(x - s, y - s) and not on(x + s, y - s)
    # Everything outside the shapes' boxes is background.
    assert np.all(img[~covered] == 0)


# --------------------------------------------------------------------- text_files ---

FILES = {
    "a.txt": "First paragraph.\nStill first.\n\nSecond one.\n   \nThird, after a whitespace line.\n",
    "b.txt": "naïve café — 日本語\n\n\n\nfifth\r\n\r\nsixth with CRLF\r\n",
    "c.txt": "seventh\n\neighth\n\nninth\n\ntenth\n\neleventh\n",
}
# Split on the exact separator "\n\n", verbatim: nothing stripped, CRLF kept.
SEPARATOR = "\n\n"
EXPECTED_DOCS = [
    "First paragraph.\nStill first.",
    "Second one.\n   \nThird, after a whitespace line.\n",
    "naïve café — 日本語",
    "fifth\r\n\r\nsixth with CRLF\r\n",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh\n",
]


def _write_files(root):
  root.mkdir(parents=True, exist_ok=True)
  for name, text in FILES.items():
    with open(root / name, "w", encoding="utf-8", newline="") as f:
      f.write(text)


def _text_splits(paths, data_dir, **kw):
  return {s: _records(load_text_files(paths, s, data_dir=data_dir, **kw)) for s in ("train", "validation")}


def test_text_files_documents_in_exactly_one_split(tmp_path):
  _write_files(tmp_path / "files")
  splits = _text_splits([str(tmp_path / "files" / "*.txt")], tmp_path / "data",
                        document_separator=SEPARATOR)
  assert splits["train"] and splits["validation"]
  indices = {s: [int(r["doc_index"]) for r in rs] for s, rs in splits.items()}
  assert not set(indices["train"]) & set(indices["validation"])
  assert sorted(indices["train"] + indices["validation"]) == list(range(len(EXPECTED_DOCS)))
  texts = sorted(_s(r["text"]) for rs in splits.values() for r in rs)
  assert texts == sorted(EXPECTED_DOCS)  # round-trip, each document exactly once
  for rs in splits.values():
    for r in rs:
      assert _s(r["text"]) == EXPECTED_DOCS[int(r["doc_index"])]
      assert os.path.basename(_s(r["source"])) in FILES

  # Same files named by a directory, built elsewhere: the same assignment.
  again = _text_splits([str(tmp_path / "files")], tmp_path / "data2",
                       document_separator=SEPARATOR)
  assert sorted(int(r["doc_index"]) for r in again["validation"]) == sorted(indices["validation"])


def test_text_files_whole_file_documents_and_stale_data(tmp_path):
  _write_files(tmp_path / "files")
  paths = [str(tmp_path / "files")]
  splits = _text_splits(paths, tmp_path / "data")  # default: whole files, verbatim
  texts = sorted(_s(r["text"]) for rs in splits.values() for r in rs)
  assert texts == sorted(FILES.values())  # byte for byte: blank lines, CRLF, trailing \n
  # Changing a file must not reuse the data prepared from its old content.
  with open(tmp_path / "files" / "c.txt", "a", encoding="utf-8") as f:
    f.write("appended\n")
  splits = _text_splits(paths, tmp_path / "data")
  assert any(_s(r["text"]).endswith("appended\n") for rs in splits.values() for r in rs)


def test_text_files_tail_split_of_one_file(tmp_path):
  """split_mode='tail': one long text, its last 10 % by position is validation (nanoGPT)."""
  text = "".join(f"line {i}\n\n  indented {i}\n" for i in range(200))
  (tmp_path / "one.txt").write_text(text, encoding="utf-8")
  splits = _text_splits([str(tmp_path / "one.txt")], tmp_path / "data",
                        validation_fraction=0.1, split_mode="tail")
  train, val = (_s(splits[s][0]["text"]) for s in ("train", "validation"))
  assert train + val == text and len(val) == round(0.1 * len(text))
  with pytest.raises(ValueError, match="split_mode='random'"):
    load_text_files([str(tmp_path / "one.txt")], "train", data_dir=tmp_path / "d2",
                    split_mode="random")


def test_text_files_no_match_names_pattern(tmp_path):
  pattern = str(tmp_path / "nothing_here_*.txt")
  with pytest.raises(ValueError, match=re.escape(pattern)):
    load_text_files([pattern], "train", data_dir=tmp_path / "data")
  # One typo among good patterns is not silently ignored either.
  _write_files(tmp_path / "files")
  with pytest.raises(ValueError, match=re.escape(pattern)):
    load_text_files([str(tmp_path / "files"), pattern], "train", data_dir=tmp_path / "data")


# -------------------------------------------------------------------- load_source ---


def test_load_source_builtin_shapes(tmp_path, shapes_a):
  src = load_source("shapes", "validation", data_dir=tmp_path, **SIZES)
  assert len(src) == SIZES["validation_size"]
  assert src[0]["image"].tobytes() == shapes_a["validation"][0]["image"].tobytes()


def test_load_source_unknown_name(tmp_path):
  with pytest.raises((ValueError, RuntimeError)) as info:
    load_source("no_such_dataset_xyz", "train", data_dir=tmp_path)
  msg = str(info.value)
  assert "no_such_dataset_xyz" in msg and "tfds build" in msg
  assert info.value.__cause__ is not None
  assert str(info.value.__cause__)[:40] in msg  # the original reason is quoted


def test_load_source_known_but_not_prepared(tmp_path):
  """A real TFDS name with nothing prepared: a clear error, and nothing is downloaded."""
  with pytest.raises((ValueError, RuntimeError)) as info:
    load_source("mnist", "train", data_dir=tmp_path)
  assert "mnist" in str(info.value) and "not prepared" in str(info.value)
  assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())
