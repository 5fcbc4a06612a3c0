"""The draw task wired into training: config validation, the image tokenizer trained before
the LM and kept on resume, draw rows mixed into the batches (checked against the
tokenizer's own codes of the training images), the draw metrics, and the draw CLI.

One tiny draw run (module fixture) serves every test; nothing here aims at quality."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from _train_helpers import (SHAPES_KW, compile_cache_dir, persistent_compile_cache,  # noqa: F401
                            shapes_data_dir, tiny_vlm_config, train_rows)

LEVELS = (4, 4)  # a 16-code codebook
GRID = 4  # 16 codes per 16x16 image


def draw_config(data_dir: str, **draw):
  # vocab >= 304 shapes words + 16 codes + <img>; one layer and 31-token rows (the shapes
  # words: prompts <= 13 tokens, captions 13, codes 16) keep compiling short.
  c = tiny_vlm_config(data_dir, vocab_size=328, depth=1, max_seq_len=32)
  c.data.tokenizer = "shapes"
  c.data.prompt_len, c.data.target_len, c.data.packed_len = 16, 16, 32
  c.draw.enabled = True
  c.draw.rows_fraction = 0.5
  c.draw.codes.grid, c.draw.codes.levels = GRID, LEVELS
  c.draw.codes.channels, c.draw.codes.head, c.draw.codes.depth = 8, 1, 0  # depth 1: +20 s compile
  c.draw.codes.steps, c.draw.codes.batch_size = 3, 16
  c.draw.eval_examples, c.draw.samples, c.draw.best_of = 4, 2, 2
  c.train.steps = 3
  c.data.test_split = ""  # the final eval on validation only: one more eval costs ~6 s
  for k, v in draw.items():
    c.draw[k] = v
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_data_dir, compile_cache_dir):  # noqa: F811
  """(config, workdir, summary) of a 3-step draw run (final eval on, decoding off)."""
  from gptjax import runs
  c = draw_config(shapes_data_dir)
  workdir = str(tmp_path_factory.mktemp("draw_run"))
  with persistent_compile_cache(compile_cache_dir):
    summary = runs.train(c, workdir)
  return c, workdir, summary


def _err(c) -> str:
  from gptjax import runs
  with pytest.raises(ValueError) as e:
    runs.validate(c)
  return str(e.value)


def test_validation_names_keys_and_numbers(shapes_data_dir):  # noqa: F811
  from gptjax.data.tokenizers import make_tokenizer
  need = make_tokenizer("shapes").vocab_size + int(np.prod(LEVELS)) + 1
  c = draw_config(shapes_data_dir)
  c.model.vocab_size = need - 1
  msg = _err(c)
  assert "config.model.vocab_size" in msg and f">= {need}" in msg
  c = draw_config(shapes_data_dir)
  c.data.target_len = GRID * GRID - 1
  msg = _err(c)
  assert "config.data.target_len" in msg and str(GRID * GRID) in msg
  c = draw_config(shapes_data_dir)
  c.data.pack, c.data.packed_len = True, 30
  msg = _err(c)
  assert "config.data.packed_len" in msg and str(c.data.prompt_len + c.data.target_len - 1) in msg
  c = draw_config(shapes_data_dir)
  c.model.vision = None
  c.data.name = "text_files"
  assert "config.draw.enabled" in _err(c)
  c = draw_config(shapes_data_dir, rows_fraction=1.0)
  assert "config.draw.rows_fraction" in _err(c)
  c = draw_config(shapes_data_dir, best_of=0)
  assert "config.draw.best_of" in _err(c)
  c = draw_config(shapes_data_dir, top_p=0.0)
  assert "config.draw.top_p" in _err(c)
  c = draw_config(shapes_data_dir)
  c.draw.codes.grid = 5  # 16 px images do not divide into 5 x 5 cells
  assert "config.draw.codes" in _err(c)


def test_prompt_len_checked_before_training(shapes_data_dir, tmp_path):  # noqa: F811
  from gptjax.data.datasets import load_source
  from gptjax.data.tokenizers import make_tokenizer
  from gptjax.train import draw_data
  c = draw_config(shapes_data_dir)
  c.data.prompt_len = 6
  src = load_source("shapes", "train", data_dir=shapes_data_dir, **SHAPES_KW)
  tok = make_tokenizer("shapes")
  need = max(len(tok.encode(src[i]["caption"].decode(), bos=True)) + 1 for i in range(len(src)))
  assert need > 6
  with pytest.raises(ValueError, match=rf"config\.data\.prompt_len=6 .*>= {need}\b"):
    draw_data.prepare(c, str(tmp_path), src, progress=False)


@pytest.mark.parametrize("pack", [False, True])
def test_batches_mix_draw_rows_and_restore(run, pack):
  """Half the rows are draw rows whose targets are exactly one training image's codes (the
  saved tokenizer's own encoding, recomputed here) behind ``<bos> caption <img>``; rows
  have one length; a restored iterator continues with the same batches."""
  from gptjax.data.datasets import load_source
  from gptjax.tasks import image_codes as ic
  from gptjax.tasks import image_codes_store as ic_store
  from gptjax.train import draw_data
  c, workdir, _ = run
  c = c.copy_and_resolve_references()
  c.data.pack = pack
  src = load_source("shapes", "train", data_dir=c.data.data_dir, **SHAPES_KW)
  tokenizer = ic_store.load(os.path.join(workdir, "image_codes"))
  images = np.stack([src[i]["image"] for i in range(len(src))])
  want = {tuple(row) for row in ic.encode(tokenizer, images)}
  d = draw_data.prepare(c, workdir, src, progress=False)
  assert not d.trained
  offset, img_id = d.layout.code_offset, d.layout.img_id
  p = draw_data.pipeline(c, src, d, batch_size=8)
  n_draw = n_rows = 0
  for _ in range(4):
    b = next(p)
    t = c.data.packed_len if pack else c.data.prompt_len + c.data.target_len - 1
    assert b["inputs"].shape == (8, t) and b["image"].shape == (8, 16, 16, 3)
    for i in range(8):
      tg = b["targets"][i][b["loss_mask"][i] > 0]
      n_rows += 1
      if len(tg) and tg.min() >= offset and tg.max() < img_id:
        n_draw += 1
        assert len(tg) == GRID * GRID and tuple(tg - offset) in want
        assert img_id in b["inputs"][i] and not b["image"][i].any()  # blank image
  assert n_draw == n_rows // 2
  state = p.iterator.get_state()
  nxt = next(p)
  p2 = draw_data.pipeline(c, src, d, batch_size=8)
  p2.iterator.set_state(state)
  again = next(p2)
  assert all(np.array_equal(nxt[k], again[k]) for k in nxt)


def test_run_trains_saves_codes_and_reports_metrics(run):
  c, workdir, summary = run
  assert os.path.exists(os.path.join(workdir, "image_codes", "config.json"))
  rows = train_rows(workdir)
  assert len(rows) == c.train.steps and all(math.isfinite(r["loss"]) for r in rows)
  for split in ("eval",):
    m = summary[split]
    for k in ("draw_colors", "draw_count", "draw_color_and_count", "draw_all",
              "codes_palette_acc"):
      assert 0.0 <= m[k] <= 1.0, (split, k, m[k])
    assert m["draw_color_and_count"] <= min(m["draw_colors"], m["draw_count"])
    assert m["draw_all"] <= m["draw_color_and_count"]
    for k in ("draw_best_colors", "draw_best_count", "draw_best_color_and_count",
              "draw_best_all"):  # best_of=2: the model's pick of two samples per prompt
      assert 0.0 <= m[k] <= 1.0, (split, k, m[k])
  assert os.path.exists(os.path.join(workdir, "drawings_eval.png"))


def test_resume_keeps_the_tokenizer_and_the_data_position(run, monkeypatch):
  """What ``run()`` does on resume, minus the model (a whole second run costs ~20 s of
  compiling): ``prepare`` loads ``image_codes/`` instead of training (same file, same
  codes), and the data-iterator state saved in the last checkpoint, set on a fresh mixed
  pipeline, continues exactly where an uninterrupted one would."""
  from gptjax.data.datasets import load_source
  from gptjax.tasks import image_codes as ic
  from gptjax.tasks import image_codes_store as ic_store
  from gptjax.train import draw_data
  c, workdir, _ = run
  path = os.path.join(workdir, "image_codes")
  src = load_source("shapes", "train", data_dir=c.data.data_dir, **SHAPES_KW)
  images = np.stack([src[i]["image"] for i in range(len(src))])
  before = ic.encode(ic_store.load(path), images)
  mtime = os.path.getmtime(os.path.join(path, "params.safetensors"))

  def no_retraining(*a, **k):
    raise AssertionError("a resumed draw run retrained its image tokenizer")

  monkeypatch.setattr(ic, "train_image_codes", no_retraining)
  d = draw_data.prepare(c, workdir, src, progress=False)
  assert not d.trained
  assert os.path.getmtime(os.path.join(path, "params.safetensors")) == mtime
  np.testing.assert_array_equal(d.codes, before)

  step = c.train.steps
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
    saved = json.load(f)
  fresh = draw_data.pipeline(c, src, d, batch_size=c.train.batch_size)
  for _ in range(step):  # the run consumed one batch per step
    next(fresh)
  restored = draw_data.pipeline(c, src, d, batch_size=c.train.batch_size)
  restored.iterator.set_state(saved)
  for _ in range(2):
    a, b = next(fresh), next(restored)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_best_of_keeps_the_sample_the_model_scores_highest(run):
  """``draw_best_of``: K samples per caption, the kept one is the argmax of the caption's
  likelihood given each sample, recomputed here through the full score grid
  (``generative_scores``, a second code path); K = 1 is plain ``draw_images``."""
  from gptjax.runs import load_model
  from gptjax.tasks.match import generative_scores
  from gptjax.train.draw_data import load_image_codes
  from gptjax.train.evaluate_draw import draw_best_of, draw_images
  from gptjax.train.load import load_run_tokenizer
  c, workdir, _ = run
  model, codes, tok = load_model(workdir), load_image_codes(workdir), load_run_tokenizer(workdir, c)
  caps = ["a red circle", "a blue square and a green triangle"]
  chosen, cands, scores = draw_best_of(model, c, caps, codes, 3, seed=1, tokenizer=tok)
  assert cands.shape == (2, 3, 16, 16, 3) and chosen.shape == (2, 16, 16, 3)
  for i, cap in enumerate(caps):
    s = generative_scores(model, cands[i], [cap], tok)[:, 0]
    np.testing.assert_allclose(scores[i], s, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(chosen[i], cands[i][int(np.argmax(s))])
  single, one, none = draw_best_of(model, c, caps, codes, 1, seed=1, tokenizer=tok)
  assert none is None
  np.testing.assert_array_equal(single, draw_images(model, c, caps, codes, seed=1, tokenizer=tok))
  assert one.shape == (2, 1, 16, 16, 3)
  with pytest.raises(ValueError, match="best_of=0 is invalid"):
    draw_best_of(model, c, caps, codes, 0)


def test_cli_draws_a_grid_and_fails_cleanly(run, tmp_path, capsys, compile_cache_dir):
  from gptjax.tasks import draw as cli
  from gptjax.train.load import save_run_config
  c, workdir, _ = run
  out = tmp_path / "out.png"
  with persistent_compile_cache(compile_cache_dir):
    rc = cli.main(["--workdir", workdir, "a red circle and a blue square", "--n", "5",
                   "--scale", "2", "--temperature", "0.7", "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  from PIL import Image
  with Image.open(out) as im:
    assert im.size == (4 * 16 * 2, 2 * 16 * 2)  # 4 columns, 2 rows of 16 px images at x2
  printed = capsys.readouterr().out
  assert printed.count("sees:") == 5 and "colors=" in printed

  plain = tiny_vlm_config(c.data.data_dir)  # draw.enabled=False
  plain_dir = tmp_path / "plain"
  plain_dir.mkdir()
  save_run_config(plain, str(plain_dir))
  assert json.load(open(plain_dir / "config.json"))["draw"]["enabled"] is False
  rc = cli.main(["--workdir", str(plain_dir), "a red circle", "--out", str(tmp_path / "x.png")])
  err = capsys.readouterr().err
  assert rc == 2 and "config.draw.enabled" in err and len(err.strip().splitlines()) == 1
  rc = cli.main(["--workdir", workdir, "a red circle", "--n", "0", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and "--n=0" in err
  rc = cli.main(["--workdir", workdir, "a red circle", "--best-of", "0", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and "--best-of=0" in err and "positive integer" in err
  rc = cli.main(["--workdir", workdir, "a red circle", "--top-p", "1.5", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and "--top-p=1.5" in err and "(0, 1]" in err
