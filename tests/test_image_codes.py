"""The FSQ image tokenizer (against a NumPy transcription of the paper's formulas and the
shapes images it must reconstruct) and the draw task's sampling and row plumbing."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax.data.builders.shapes.shapes import generate_example
from gptjax.data.pipeline import DrawSource, draw_dataset, encode_draw
from gptjax.data.tokenizers import ByteTokenizer, WordTokenizer
from gptjax.data.builders.shapes.shapes import vocabulary
from gptjax.generate import generate
from gptjax.tasks import drawing as draw, image_codes as ic, shapes_analyser as sa
from gptjax.tasks import image_codes_store as ic_store

STEPS = 300  # measured: palette accuracy 0.979, foreground 0.904 at 300 steps (see below)


@pytest.fixture(scope="module")
def trained():
  train = np.stack([generate_example(3, 0, i)["image"] for i in range(512)])
  held = [generate_example(3, 1, i) for i in range(128)]
  cfg = ic.ImageCodesConfig()
  model, metrics = ic.train_image_codes(train, cfg, steps=STEPS, batch_size=32, seed=0,
                                        progress=False)
  return model, metrics, held


def _np_fsq(z, levels):
  """The paper's FSQ in float64 NumPy: bound, round, normalise; mixed-radix index."""
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 - 1e-3) / 2
  offset = np.where(lv % 2 == 1, 0.0, 0.5)
  bounded = np.tanh(z + np.tan(offset / half_l)) * half_l - offset
  half_w = np.floor(lv / 2)
  q = np.round(bounded) / half_w
  digits = np.round(q * half_w + half_w).astype(np.int64)
  basis = np.cumprod([1] + list(levels[:-1]))
  return q, (digits * basis).sum(-1), bounded


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (5, 5, 5), (2, 3)])
def test_fsq_matches_numpy(levels):
  z = np.random.default_rng(0).normal(0, 2, (4096, len(levels)))
  q_ref, idx_ref, bounded = _np_fsq(z, levels)
  # Skip values that sit within float32 noise of a rounding boundary.
  safe = (np.abs(bounded - np.floor(bounded) - 0.5) > 1e-4).all(-1)
  quantize = jax.jit(ic.fsq_quantize, static_argnums=1)  # one compile, not one per op
  q = np.asarray(quantize(jnp.asarray(z, jnp.float32), levels))
  idx = np.asarray(jax.jit(ic.fsq_indices, static_argnums=1)(jnp.asarray(q), levels))
  np.testing.assert_allclose(q[safe], q_ref[safe], atol=1e-6)
  np.testing.assert_array_equal(idx[safe], idx_ref[safe])
  assert idx.min() >= 0 and idx.max() < np.prod(levels)
  for d, L in enumerate(levels):  # each channel takes exactly L values
    assert len(np.unique(np.round(q[:, d], 5))) == L
  # Ids -> values -> ids is the identity over the whole codebook.
  all_ids = jnp.arange(int(np.prod(levels)), dtype=jnp.int32)
  round_trip = jax.jit(lambda i: ic.fsq_indices(ic.fsq_values(i, levels), levels))
  np.testing.assert_array_equal(round_trip(all_ids), all_ids)
  # Straight-through: the gradient is that of the bound (rounding passes it unchanged).
  grad = jax.jit(jax.grad(lambda x: ic.fsq_quantize(x, levels).sum()))
  g = np.asarray(grad(jnp.asarray(z, jnp.float32)))
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 - 1e-3) / 2
  shift = np.tan(np.where(lv % 2 == 1, 0.0, 0.5) / half_l)
  g_ref = (1 - np.tanh(z + shift) ** 2) * half_l / np.floor(lv / 2)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError, match="grid"):
    ic.ImageCodesConfig(grid=5)
  with pytest.raises(ValueError, match="levels"):
    ic.ImageCodesConfig(levels=(8, 1))
  with pytest.raises(ValueError, match="channels"):
    ic.ImageCodesConfig(channels=0)
  with pytest.raises(ValueError, match=r"order='diagonal'.*'rows', 'columns'"):
    ic.ImageCodesConfig(order="diagonal")
  cfg = ic.ImageCodesConfig(levels=[5, 5, 5], grid=4)
  assert cfg.levels == (5, 5, 5) and cfg.codebook_size == 125 and cfg.num_codes == 16
  with pytest.raises(ValueError, match="images"):
    ic.train_image_codes(np.zeros((4, 16, 16, 3), np.uint8), cfg, steps=1)


def test_reconstruction(trained):
  model, metrics, held = trained
  assert metrics["loss"][-1] < 0.5 * metrics["loss"][0]
  images = np.stack([e["image"] for e in held])
  codes = ic.encode(model, images)
  assert codes.dtype == np.int32 and codes.shape == (len(held), 64)
  assert codes.min() >= 0 and codes.max() < model.config.codebook_size
  err = ic.reconstruction_error(model, images)
  # Independent check of the palette accuracy: nearest colour by brute force over 7 colours.
  rec = ic.decode(model, codes)
  d = ((rec[..., None, :].astype(int) - sa.FULL_PALETTE.astype(int)) ** 2).sum(-1)
  d0 = ((images[..., None, :].astype(int) - sa.FULL_PALETTE.astype(int)) ** 2).sum(-1)
  acc = (d.argmin(-1) == d0.argmin(-1)).mean()
  assert abs(acc - err["palette_accuracy"]) < 1e-9
  background = (images == 0).all(-1).mean()  # what an all-black output would score
  # Measured at 300 steps (batch 32, 512 images): palette 0.979, foreground 0.904, mean abs
  # error 7.0; the analyser read the right colours and count on 0.977 of the reconstructions
  # (the kinds on only ~0.4: corners still rounded / edges filled this early).
  assert err["palette_accuracy"] >= 0.95 > background + 0.05, (err, background)
  assert err["foreground_accuracy"] >= 0.80, err
  assert err["mean_abs_error"] < 15, err
  ok = [(m := sa.matches(r, e))["colors"] and m["count"] for r, e in zip(rec, held)]
  assert np.mean(ok) >= 0.85, np.mean(ok)


def test_column_order(trained, tmp_path):
  """order='columns' flattens the same code grid column by column, and decodes it back."""
  from flax import nnx
  model, _, held = trained
  images = np.stack([e["image"] for e in held[:16]])
  cols_model = ic.ImageCodes(dataclasses.replace(model.config, order="columns"),
                             rngs=nnx.Rngs(1))
  nnx.update(cols_model, nnx.state(model, nnx.Param))
  rows, cols = ic.encode(model, images), ic.encode(cols_model, images)
  g = model.config.grid
  grid = rows.reshape(-1, g, g)  # [image, row, column]
  assert cols[0, 1] == grid[0, 1, 0] and cols[0, g] == grid[0, 0, 1]
  np.testing.assert_array_equal(cols.reshape(-1, g, g), grid.transpose(0, 2, 1))
  np.testing.assert_array_equal(ic.decode(cols_model, cols), ic.decode(model, rows))
  ic_store.save(cols_model, cols_model.config, str(tmp_path / "cols"))
  assert ic_store.load(str(tmp_path / "cols")).config.order == "columns"


def test_save_load_round_trip(trained, tmp_path):
  model, _, held = trained
  images = np.stack([e["image"] for e in held[:32]])
  path = str(tmp_path / "run" / "image_codes")
  ic_store.save(model, model.config, path)
  ic_store.save(model, model.config, path)  # replacing an existing one works
  assert sorted(os.listdir(tmp_path / "run")) == ["image_codes"]  # no temporaries left
  loaded = ic_store.load(path)
  assert loaded.config == model.config
  np.testing.assert_array_equal(ic.encode(loaded, images), ic.encode(model, images))
  codes = ic.encode(model, images)
  np.testing.assert_array_equal(ic.decode(loaded, codes), ic.decode(model, codes))
  with pytest.raises(ValueError, match="config"):
    ic_store.save(model, dataclasses.replace(model.config, grid=4), path)
  with pytest.raises(ValueError, match="directory"):
    ic_store.load(str(tmp_path / "nothing"))


def _tiny_model(vocab_size):
  cfg = gptjax.preset("tiny", vocab_size=vocab_size, position="rope", max_seq_len=128, depth=1)
  return gptjax.from_config(cfg, seed=0)


def test_draw_sample_only_image_codes():
  tok = ByteTokenizer()
  layout = draw.draw_tokens(tok.vocab_size, 125)
  assert layout.vocab_size == tok.vocab_size + 126 and layout.img_id == tok.vocab_size + 125
  model = _tiny_model(layout.vocab_size + 3)  # a few unused ids past the layout
  mask = layout.code_mask(model.config.vocab_size)
  assert mask.sum() == 125 and mask[tok.vocab_size] and not mask[layout.img_id]
  assert not mask[:tok.vocab_size].any() and not mask[layout.img_id:].any()
  n = 8  # a toy length: what is checked is "exactly n codes and nothing else"
  prompts = [draw.draw_prompt(tok, "a red square", layout), draw.draw_prompt(tok, "a", layout)]
  plain = draw.sample_codes(model, prompts, layout, n, temperature=0.0)
  assert plain.shape == (2, n) and plain.dtype == np.int32
  assert plain.min() >= 0 and plain.max() < 125
  # The same greedy decoding with every id allowed (an all-True mask: no new compile) leaves
  # the codes (a random model's argmax falls anywhere, only ~1/3 of the ids are codes): so
  # the mask is what keeps a sample drawable.
  free = np.asarray(generate(model, prompts, n, logits_mask=np.ones(model.config.vocab_size,
                                                                      bool)))
  assert free.shape == (2, n) and not mask[free].all()
  # Guidance: s = 1 is the conditional model, s = 0 the unconditional one (greedy).
  uncond = draw.draw_prompt(tok, "", layout)
  assert uncond == [tok.bos_id, layout.img_id]
  guided = {s: draw.sample_codes(model, prompts, layout, n, temperature=0.0, cfg_scale=s,
                                 uncond_ids=uncond) for s in (1.0, 0.0, 3.0)}
  np.testing.assert_array_equal(guided[1.0], plain)
  # The unconditional prompt alone, left-padded to the same (2, T) shape (one compile).
  t = max(map(len, prompts))
  tokens = np.zeros((2, t), np.int32)
  tokens[:, t - 2:] = uncond
  pmask = np.zeros((2, t), bool)
  pmask[:, t - 2:] = True
  alone = np.asarray(generate(model, tokens, n, prompt_mask=pmask, logits_mask=mask))
  np.testing.assert_array_equal(guided[0.0], layout.codes(alone))
  assert not np.array_equal(guided[3.0], plain)
  with pytest.raises(ValueError, match="uncond_ids"):
    draw.sample_codes(model, prompts, layout, n, cfg_scale=2.0)
  with pytest.raises(ValueError, match="logits_mask"):
    generate(model, prompts, 4, logits_mask=np.zeros(model.config.vocab_size, bool))
  with pytest.raises(ValueError, match="2B prompt rows"):
    generate(model, prompts[:1], 4, cfg_scale=2.0)
  with pytest.raises(ValueError, match="vocab_size_total"):
    layout.code_mask(layout.vocab_size - 1)


def test_encode_draw_row_layout():
  tok = WordTokenizer(vocabulary())
  layout = draw.draw_tokens(tok.vocab_size, 1000)
  codes = np.array([5, 0, 999, 7], np.int32)
  row = encode_draw("a red square", codes, tok, img_id=layout.img_id,
                    code_offset=layout.code_offset, prompt_len=8, target_len=6,
                    image_shape=(32, 32, 3))
  p = tok.encode("a red square")
  assert len(p) == 3  # one token per word
  pad, bos, img, off = tok.pad_id, tok.bos_id, layout.img_id, tok.vocab_size
  seq = [pad, pad, pad, bos] + p + [img] + [off + 5, off, off + 999, off + 7, pad, pad]
  real = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
  np.testing.assert_array_equal(row["inputs"], seq[:-1])
  np.testing.assert_array_equal(row["targets"], seq[1:])
  # The loss is on the 4 codes (targets at inputs 7..10: <img> predicts the first code).
  np.testing.assert_array_equal(row["loss_mask"], [0] * 7 + [1, 1, 1, 1] + [0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1 if r else -1 for r in real[:-1]])
  np.testing.assert_array_equal(row["positions"], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
  np.testing.assert_array_equal(row["prompt"], seq[:8])
  assert row["is_caption"] == 0 and row["image"].shape == (32, 32, 3) and not row["image"].any()
  # Same keys, shapes and dtypes as a vqa row of the same lengths: the two mix in a batch.
  from gptjax.data.pipeline import Example, encode_vqa
  vqa = encode_vqa(Example(np.zeros((32, 32, 3), np.uint8), "what color is the square?",
                           "red", "vqa"), tok, 8, 6)
  assert {k: (v.shape, v.dtype) for k, v in vqa.items()} == \
      {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in row.items()}
  with pytest.raises(ValueError, match="target_len"):
    encode_draw("a red square", np.zeros(7, np.int32), tok, img_id=img, code_offset=off,
                prompt_len=8, target_len=6)
  with pytest.raises(ValueError, match="codes"):
    encode_draw("a red square", np.array([1000]), tok, img_id=img, code_offset=off,
                prompt_len=8, target_len=6)


def test_draw_source_and_dataset():
  records = [{"caption": f"a red {k}".encode()} for k in ("square", "circle", "triangle")] * 20
  codes = np.arange(60 * 4, dtype=np.int32).reshape(60, 4)
  tok = WordTokenizer(vocabulary())
  src = DrawSource(records, codes, uncond_prob=0.25, seed=3)
  again = DrawSource(records, codes, uncond_prob=0.25, seed=3)
  items = [src[i] for i in range(60)]
  assert [again[i][0] for i in range(60)] == [c for c, _ in items]  # deterministic
  dropped = [c == "" for c, _ in items]
  assert 5 <= sum(dropped) <= 25
  for i, (cap, c) in enumerate(items):
    np.testing.assert_array_equal(c, codes[i])
    assert cap in ("", records[i]["caption"].decode())
  layout = draw.draw_tokens(tok.vocab_size, 256)
  ds = draw_dataset(src, tok, img_id=layout.img_id, code_offset=layout.code_offset,
                    prompt_len=8, target_len=4)
  row = ds[1]
  np.testing.assert_array_equal(row["targets"][-4:], codes[1] + tok.vocab_size)
  with pytest.raises(ValueError, match="len\\(source\\)"):
    DrawSource(records, codes[:10])
