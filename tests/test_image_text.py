"""The ``image_text`` builder (a user's folder of images + captions), the caption metrics
(BLEU-4 / CIDEr-D vs pycocoevalcap) and the ``caption_folder`` config.

Every expected value is computed independently of the code under test: pixels from the
arrays the test drew (or Pillow decoding the file), splits from sha256 of the file names,
metrics from pycocoevalcap.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from gptjax.data.builders.image_text import load_image, load_image_text, skipped_items
from gptjax.data.datasets import load_source
from gptjax.data.pipeline import CAPTION_PROMPT
from gptjax.tasks.caption_metrics import bleu4, caption_scores, cider, tokenize

S = 16
SPLITS = ("train", "validation", "test")


def _rng_image(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_jsonl(folder, rows):
  with open(os.path.join(folder, "captions.jsonl"), "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _good_folder(folder, n=3):
  """``n`` RGB PNGs, one per split, each captioned (the base of the bad-folder cases)."""
  os.makedirs(folder, exist_ok=True)
  rows = []
  for i in range(n):
    Image.fromarray(_rng_image(100 + i, (S, S, 3))).save(os.path.join(folder, f"g{i}.png"))
    rows.append({"file": f"g{i}.png", "caption": f"good {i}", "split": SPLITS[i % 3]})
  return rows


def _records(src):
  return [src[i] for i in range(len(src))]


def _s(x):
  return x.decode() if isinstance(x, bytes) else str(x)


# -- the main folder: four image kinds, multi-caption, QA, given and hashed splits ---------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imgs")
  d = str(root / "photos")
  os.makedirs(os.path.join(d, "sub"))
  expected = {}  # file -> the (S, S, 3) uint8 image the builder must store
  rgb = _rng_image(0, (S, S, 3))
  Image.fromarray(rgb).save(os.path.join(d, "rgb.png"))
  expected["rgb.png"] = rgb
  gray = _rng_image(1, (S, S))
  Image.fromarray(gray, "L").save(os.path.join(d, "gray.png"))
  expected["gray.png"] = np.repeat(gray[..., None], 3, axis=-1)
  rgba = _rng_image(2, (S, S, 4))
  Image.fromarray(rgba, "RGBA").save(os.path.join(d, "sub", "alpha.png"))
  a = rgba[..., 3:].astype(np.float64) / 255.0  # over white
  expected["sub/alpha.png"] = np.round(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
  palette, idx = _rng_image(4, (256, 3)), _rng_image(5, (S, S))
  pal = Image.fromarray(idx, "P")
  pal.putpalette(palette.reshape(-1).tolist())
  pal.save(os.path.join(d, "pal.png"))
  expected["pal.png"] = palette[idx]
  Image.fromarray(_rng_image(3, (S, S, 3))).save(os.path.join(d, "photo.jpg"), quality=90)
  expected["photo.jpg"] = np.asarray(Image.open(os.path.join(d, "photo.jpg")).convert("RGB"))
  extra = [f"x{i}.png" for i in range(12)]  # hash-assigned splits
  for i, name in enumerate(extra):
    img = _rng_image(10 + i, (S, S, 3))
    Image.fromarray(img).save(os.path.join(d, name))
    expected[name] = img
  rows = [
      {"file": "rgb.png", "captions": ["A red, red thing.", "second caption"], "split": "train",
       "qa": [{"question": "what?", "answer": "thing"}, {"question": "how many?", "answer": "2"},
              {"question": "where?", "answer": "left"}]},
      {"file": "gray.png", "caption": "a grey square", "split": "validation",
       "qa": [{"question": "colour?", "answer": "grey"}]},
      {"file": "sub/alpha.png", "captions": ["see-through", "two", "three"], "split": "test"},
      {"file": "photo.jpg", "caption": "a photo", "split": "train"},
      {"file": "pal.png", "caption": "a palette image", "split": "validation"},
  ] + [{"file": n, "caption": f"extra {n}"} for n in extra]
  _write_jsonl(d, rows)
  data_dir = str(root / "tfds")
  sources = {s: load_image_text(d, s, data_dir=data_dir, image_size=S) for s in SPLITS}
  return dict(dir=d, rows={r["file"]: r for r in rows}, expected=expected, sources=sources,
              data_dir=data_dir, extra=extra)


def _hash_split(name, fractions=(0.8, 0.1, 0.1)):
  h = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2.0**64
  return "train" if h < fractions[0] else "validation" if h < fractions[0] + fractions[1] else "test"


def test_images_round_trip_exactly(folder):
  seen = set()
  for s in SPLITS:
    for r in _records(folder["sources"][s]):
      f = _s(r["file"])
      seen.add(f)
      assert r["image"].dtype == np.uint8 and r["image"].shape == (S, S, 3)
      np.testing.assert_array_equal(r["image"], folder["expected"][f], err_msg=f)
  assert seen == set(folder["expected"])


def test_captions_and_qa(folder):
  rows = folder["rows"]
  train_pairs = set()
  for s in SPLITS:
    for r in _records(folder["sources"][s]):
      row = rows[_s(r["file"])]
      caps = row.get("captions") or [row["caption"]]
      assert [_s(c) for c in r["captions"]] == caps
      k = int(r["caption_index"])
      assert _s(r["caption"]) == caps[k]
      if s == "train":
        train_pairs.add((_s(r["file"]), k))
      else:
        assert k == 0  # one record per image outside train: the first caption
      qa = [(p["question"], p["answer"]) for p in row.get("qa", [])]
      assert int(r["qa_count"]) == len(qa)
      got = list(zip(map(_s, r["questions"]), map(_s, r["answers"])))
      assert len(got) == 3  # the most QA pairs of any image
      filler = qa or [(CAPTION_PROMPT, c) for c in caps]
      assert got == [filler[i % len(filler)] for i in range(3)]
  # Train holds one record per (image, caption) pair.
  expect = {(f, k) for f, row in rows.items() if (row.get("split") or _hash_split(f)) == "train"
            for k in range(len(row.get("captions") or [row["caption"]]))}
  assert train_pairs == expect


def test_splits_given_or_by_hash(folder):
  by_split = {s: {_s(r["file"]) for r in _records(folder["sources"][s])} for s in SPLITS}
  for f, row in folder["rows"].items():
    want = row.get("split") or _hash_split(f)
    assert [s for s in SPLITS if f in by_split[s]] == [want], f


def test_pipeline_makes_caption_and_qa_tasks(folder):
  from gptjax.data.pipeline import make_pipeline
  src = folder["sources"]["validation"]
  p = make_pipeline(src, task="vqa", batch_size=2, shuffle=False, repeat=False,
                    prompt_len=16, target_len=24, process_index=0, process_count=1)
  assert p.num_examples == 4 * len(src)  # caption + 3 QA slots per record
  assert next(iter(p))["image"].shape == (2, S, S, 3)


def test_load_source_and_cache(folder):
  src = load_source("image_text", "test", data_dir=folder["data_dir"], paths=[folder["dir"]],
                    image_size=S)
  assert sorted(_s(r["file"]) for r in _records(src)) == sorted(
      _s(r["file"]) for r in _records(folder["sources"]["test"]))
  assert skipped_items(src) == []
  with pytest.raises(ValueError, match="paths=\\[FOLDER\\]"):
    load_source("image_text", "train", paths=[])


# -- resize + centre crop, against Pillow resize + NumPy slicing ---------------------------

@pytest.mark.parametrize("w,h", [(30, 20), (20, 31), (16, 24)])
def test_resize_short_side_then_centre_crop(tmp_path, w, h):
  img = _rng_image(7, (h, w, 3))
  path = str(tmp_path / "r.png")
  Image.fromarray(img).save(path)
  size = 10 if min(w, h) != 16 else 16
  if min(w, h) == size:
    resized = img  # short side already right: crop only
  else:
    nw, nh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC))
  top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
  np.testing.assert_array_equal(load_image(path, size),
                                resized[top:top + size, left:left + size])


# -- bad folders ---------------------------------------------------------------------------

def _png_bytes(seed):
  import io
  buf = io.BytesIO()
  Image.fromarray(_rng_image(seed, (S, S, 3))).save(buf, format="PNG")
  return buf.getvalue()


def _bad_case(d, case):
  """Writes bad folder ``case`` into ``d``: (its caption rows, the text the error must name)."""
  rows = _good_folder(d)
  if case == "corrupt":
    open(os.path.join(d, "bad.png"), "wb").write(b"this is not a PNG")
    return rows + [{"file": "bad.png", "caption": "x"}], "bad.png"
  if case == "truncated":
    open(os.path.join(d, "cut.png"), "wb").write(_png_bytes(5)[:200])
    return rows + [{"file": "cut.png", "caption": "x"}], "cut.png"
  if case == "uncaptioned":
    open(os.path.join(d, "lonely.png"), "wb").write(_png_bytes(5))
    return rows, "lonely.png"
  if case == "missing_file":
    return rows + [{"file": "ghost.png", "caption": "x"}], "ghost.png"
  if case == "duplicate":
    return rows + [{"file": "g1.png", "caption": "again"}], "duplicate file name 'g1.png'"
  if case == "bad_json":
    return rows[:1] + ['{"file": "g1.png", "caption": '] + rows[1:], "line 2"
  raise AssertionError(case)


BAD_CASES = ("corrupt", "truncated", "uncaptioned", "missing_file", "duplicate", "bad_json")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_folder_is_named(tmp_path, case):
  d = str(tmp_path / "f")
  rows, needle = _bad_case(d, case)
  _write_jsonl(d, rows)
  with pytest.raises(ValueError, match=re.escape(needle)):
    load_image_text(d, "train", data_dir=str(tmp_path / "tfds"), image_size=S)


def test_missing_captions_file_names_the_accepted_names(tmp_path):
  d = str(tmp_path / "f")
  _good_folder(d)  # images, no captions file written
  with pytest.raises(ValueError, match="captions.jsonl.*captions.csv"):
    load_image_text(d, "train", data_dir=str(tmp_path / "tfds"))


def test_skip_bad_loads_the_good_and_counts_the_rest(tmp_path):
  d = str(tmp_path / "f")
  for case in ("corrupt", "truncated", "uncaptioned"):
    _bad_case(d, case)
  rows = _good_folder(d, n=6)
  rows += [{"file": "bad.png", "caption": "x"}, {"file": "cut.png", "caption": "x"},
           {"file": "ghost.png", "caption": "x"}, {"file": "g1.png", "caption": "again"}]
  rows.insert(2, "{not json")
  _write_jsonl(d, rows)
  # corrupt, truncated, lonely.png uncaptioned, ghost.png missing, g1 duplicate, bad line.
  srcs = {s: load_image_text(d, s, data_dir=str(tmp_path / "tfds"), image_size=S, skip_bad=True)
          for s in SPLITS}
  files = sorted(_s(r["file"]) for s in SPLITS for r in _records(srcs[s]))
  assert files == [f"g{i}.png" for i in range(6)]
  g1 = next(r for s in SPLITS for r in _records(srcs[s]) if _s(r["file"]) == "g1.png")
  assert _s(g1["caption"]) == "good 1"  # the first line of a duplicate is kept
  skipped = skipped_items(srcs["train"])
  assert len(skipped) == 6, skipped
  items = " ".join(p["item"] for p in skipped)
  for name in ("bad.png", "cut.png", "lonely.png", "ghost.png", "line 3", "line 11"):
    assert name in items, (name, skipped)


def test_empty_split_is_named(tmp_path):
  d = str(tmp_path / "f")
  rows = _good_folder(d, n=2)  # two images for three splits
  _write_jsonl(d, [dict(r, split="train") for r in rows])
  with pytest.raises(ValueError, match="split 'validation' is empty.*validation_fraction=0"):
    load_image_text(d, "train", data_dir=str(tmp_path / "tfds"), image_size=S)
  src = load_image_text(d, "train", data_dir=str(tmp_path / "tfds"), image_size=S,
                        train_fraction=1.0, validation_fraction=0.0, test_fraction=0.0)
  assert len(src) == 2
  with pytest.raises(ValueError, match="split 'test' is empty or unknown"):
    load_image_text(d, "test", data_dir=str(tmp_path / "tfds"), image_size=S,
                    train_fraction=1.0, validation_fraction=0.0, test_fraction=0.0)


@pytest.mark.parametrize("kw,needle", [(dict(image_size=0), "image_size"),
                                       (dict(train_fraction=0.5), "sum to 1"),
                                       (dict(colour=True), "unknown argument")])
def test_bad_options_are_named(tmp_path, kw, needle):
  d = str(tmp_path / "f")
  _write_jsonl(d, _good_folder(d))
  with pytest.raises(ValueError, match=needle):
    load_image_text(d, "train", data_dir=str(tmp_path / "tfds"), **kw)


def test_csv_captions_and_few_images_fill_every_split(tmp_path):
  d = str(tmp_path / "f")
  os.makedirs(d)
  for i in range(3):
    Image.fromarray(_rng_image(i, (S, S, 3))).save(os.path.join(d, f"c{i}.png"))
  with open(os.path.join(d, "captions.csv"), "w") as f:
    f.write('file,caption\nc0.png,"one, with a comma"\nc0.png,two\nc1.png,three\nc2.png,four\n')
  recs = {s: _records(load_image_text(d, s, data_dir=str(tmp_path / "tfds"), image_size=S))
          for s in SPLITS}
  assert all(len({_s(r["file"]) for r in recs[s]}) == 1 for s in SPLITS)  # 3 images, 3 splits
  c0 = [r for s in SPLITS for r in recs[s] if _s(r["file"]) == "c0.png"]
  assert [_s(c) for c in c0[0]["captions"]] == ["one, with a comma", "two"]
  assert "questions" not in c0[0]  # no QA in the folder: caption tasks only


def test_changed_folder_reprepares(tmp_path):
  d, data_dir = str(tmp_path / "f"), str(tmp_path / "tfds")
  rows = _good_folder(d)
  _write_jsonl(d, rows)
  first = {_s(r["file"]): r for s in SPLITS for r in _records(load_image_text(d, s, data_dir=data_dir, image_size=S))}
  assert _s(first["g0.png"]["caption"]) == "good 0"
  rows[0]["caption"] = "edited caption"
  _write_jsonl(d, rows)
  new = _rng_image(999, (S, S, 3))
  Image.fromarray(new).save(os.path.join(d, "g1.png"))
  st = os.stat(os.path.join(d, "g1.png"))
  os.utime(os.path.join(d, "g1.png"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  second = {_s(r["file"]): r for s in SPLITS for r in _records(load_image_text(d, s, data_dir=data_dir, image_size=S))}
  assert _s(second["g0.png"]["caption"]) == "edited caption"
  np.testing.assert_array_equal(second["g1.png"]["image"], new)
  assert len(os.listdir(os.path.join(data_dir, "image_text"))) == 2  # a fresh preparation


def test_hash_fallback_fills_an_empty_split():
  from gptjax.data.builders.image_text import Entry, assign_splits, split_hash
  entries = [Entry(f"f{i}.png", ("c",)) for i in range(4)]
  out = assign_splits(entries, (0.8, 0.1, 0.1))
  assert sorted(e.file for s in SPLITS for e in out[s]) == [e.file for e in entries]
  assert all(out[s] for s in SPLITS)
  # Files the hash alone would put in a split stay there when it is not empty.
  for s in SPLITS:
    natural = [e for e in entries if _hash_split(e.file) == s]
    if natural:
      assert {e.file for e in natural} == {e.file for e in out[s]}
  assert 0 <= split_hash("a") < 1


# -- caption metrics vs pycocoevalcap ------------------------------------------------------

METRIC_SETS = {
    "multi_reference": (
        ["a man riding a horse on a beach", "two dogs play in the snow", "a red bus"],
        [["a man rides a horse on the beach", "a person on a horse by the sea"],
         ["two dogs playing in snow", "dogs in the snow", "two puppies play outside"],
         ["a red double decker bus on a street"]]),
    "perfect": (["the cat sat on the mat", "a dog runs in a park"],
                [["the cat sat on the mat"], ["a dog runs in a park"]]),
    "no_overlap": (["purple elephants dancing", "quantum"],
                   [["a man eats soup"], ["the bus is red", "red bus"]]),
    "case_and_punctuation": (["A Cat, on the MAT!", "dogs... running?"],
                             [["a cat on the mat."], ["Dogs running", "a dog runs"]]),
    "short_candidates": (["a", "a dog", ""], [["a small dog"], ["a big dog in the park"],
                                               ["some words here"]]),
}


@pytest.mark.parametrize("name", sorted(METRIC_SETS))
def test_metrics_match_pycocoevalcap(name):
  bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
  cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
  preds, refs = METRIC_SETS[name]
  # pycocoevalcap splits on whitespace: feed it our tokenisation (its PTB tokenizer is Java).
  res = {i: [" ".join(tokenize(p))] for i, p in enumerate(preds)}
  gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
  want_bleu = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)[0][3]
  want_cider = cider_mod.Cider().compute_score(gts, res)[0]
  assert bleu4(preds, refs) == pytest.approx(want_bleu, rel=1e-9, abs=1e-12)
  assert cider(preds, refs) == pytest.approx(want_cider, rel=1e-9, abs=1e-12)
  scores = caption_scores(preds, refs)
  assert scores["bleu4"] == pytest.approx(want_bleu, rel=1e-9, abs=1e-12)
  assert scores["exact_match"] == sum(p in r for p, r in zip(preds, refs)) / len(preds)
  if name == "perfect":
    assert scores["exact_match"] == 1.0 and scores["bleu4"] == pytest.approx(1.0)
  if name == "no_overlap":
    assert scores["bleu4"] < 1e-6 and scores["cider"] == 0.0


def test_metrics_match_pycocoevalcap_on_random_sets():
  bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
  cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
  rng = np.random.default_rng(0)
  words = "a the red blue dog cat sits on mat runs big small".split()
  sent = lambda: " ".join(rng.choice(words, int(rng.integers(1, 10))))
  for _ in range(10):
    n = int(rng.integers(2, 8))
    preds = [sent() for _ in range(n)]
    refs = [[sent() for _ in range(int(rng.integers(1, 5)))] for _ in range(n)]
    res = {i: [p] for i, p in enumerate(preds)}
    gts = {i: list(r) for i, r in enumerate(refs)}
    assert bleu4(preds, refs) == pytest.approx(
        bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)[0][3], rel=1e-9, abs=1e-12)
    assert cider(preds, refs) == pytest.approx(
        cider_mod.Cider().compute_score(gts, res)[0], rel=1e-9, abs=1e-12)


def test_metric_inputs_are_checked():
  with pytest.raises(ValueError, match="same length"):
    bleu4(["a"], [["a"], ["b"]])
  with pytest.raises(ValueError, match=r"references\[0\]"):
    cider(["a"], ["a"])  # a string, not a list of references


# -- the caption_folder config --------------------------------------------------------------

def _tiny_caption_config(folder, data_dir):
  from gptjax.configs.caption_folder import get_config
  from gptjax.train.config import model_section, vision_section
  c = get_config()
  c.data.paths = (folder,)
  c.data.data_dir = data_dir
  c.data.prompt_len, c.data.target_len = 16, 24
  c.model = model_section("tiny", max_seq_len=40, vision=vision_section(
      kind="cnn", image_size=S, cnn_channels=(8, 8), width=16))
  c.train.steps, c.train.batch_size, c.train.log_every = 5, 8, 5
  c.checkpoint.every = 100
  c.eval.every, c.eval.at_end, c.eval.decode_examples = 0, False, 0
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  if "mfu" in c.logging:
    c.logging.mfu = False
  return c


def test_caption_folder_needs_a_folder(tmp_path):
  from gptjax.configs.caption_folder import get_config
  from gptjax.runs import train
  c = get_config()
  c.train.steps = 1
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  with pytest.raises(ValueError, match=r"--config\.data\.paths='\(\"my_images\",\)'"):
    train(c, str(tmp_path / "w"))


def test_caption_folder_builds_checked_batches(tmp_path):
  """The config's data path on a tiny folder: validate, load_split, pipeline_for, one batch
  checked against the model config (``check_batch``: shapes, dtypes, token range). Not a
  training: 5 steps through gptjax.runs.train took 150 s on the shared 2-core machine (XLA
  compiles of init, step and checkpoint transfer), and even an eager init 50 s."""
  from gptjax.batch import check_batch
  from gptjax.data.tokenizers import ByteTokenizer
  from gptjax.runs import validate
  from gptjax.train.data import load_split, pipeline_for
  d = str(tmp_path / "f")
  rows = _good_folder(d, n=12)
  for r in rows[3:]:
    del r["split"]
  _write_jsonl(d, rows)
  c = _tiny_caption_config(d, str(tmp_path / "tfds"))
  assert c.data.builder_kwargs.image_size is None  # taken from model.vision.image_size
  mcfg = validate(c)
  src = load_split(c, c.data.train_split)
  assert src[0]["image"].shape == (S, S, 3) and "questions" not in src[0]
  batch = next(iter(pipeline_for(c, src, train=True, batch_size=c.train.batch_size)))
  check_batch(batch, mcfg)
  assert batch["image"].shape == (8, S, S, 3) and batch["is_caption"].all()
  # Row 0's target is one of the folder's captions, byte-encoded, then <eos>.
  tok = ByteTokenizer()
  target = batch["targets"][0][batch["loss_mask"][0] > 0]
  assert target[-1] == tok.eos_id
  assert tok.decode(target[:-1]) in {r["caption"] for r in rows}
