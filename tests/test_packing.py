"""Padding and packing: a padded or packed row must compute exactly what each of its
sequences computes alone (second code path: the unpadded, unpacked model call)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gptjax
from gptjax.data.pipeline import Example, encode_packed, encode_vqa
from gptjax.data.tokenizers import ByteTokenizer
from gptjax.generate import generate, pad_prompts
from gptjax.runs import base_config
from gptjax.train.config import model_section, validate, vision_section

VISION = gptjax.VisionConfig(kind="cnn", image_size=16, cnn_channels=(8, 8), width=16)


def _vlm(attention):
  cfg = gptjax.preset("tiny", attention=attention, linear_chunk_size=4, max_seq_len=96,
                      vision=VISION)
  return gptjax.from_config(cfg, seed=3)


# Jitted forward: one compilation per (model, input shapes). Eager, every op of every new
# shape compiled on its own (measured: the left-padding test 19 -> 3 s).
_fwd = nnx.jit(lambda m, tokens, **kw: m(tokens, **kw))


def _images(n):
  return jax.random.uniform(jax.random.key(1), (n, 16, 16, 3))


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_ragged_batched_generate_equals_each_prompt_alone(attention):
  model = _vlm(attention)
  images = _images(3)
  prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
  batched = np.asarray(generate(model, prompts, 6, image=images))
  for i, p in enumerate(prompts):
    alone = np.asarray(generate(model, [p], 6, image=images[i:i + 1]))[0]
    np.testing.assert_array_equal(batched[i], alone)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_left_padded_forward_equals_unpadded(attention):
  model = _vlm(attention)
  images = _images(3)
  prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
  tokens, mask = pad_prompts(prompts, pad_id=ByteTokenizer.pad_id)
  seg = np.where(mask, 1, -1)
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  logits = _fwd(model, jnp.asarray(tokens), image=images, segment_ids=jnp.asarray(seg),
                positions=jnp.asarray(pos))
  for i, p in enumerate(prompts):
    alone = _fwd(model, jnp.asarray([p]), image=images[i:i + 1])[0]
    np.testing.assert_allclose(logits[i, -len(p):], alone, atol=2e-5, rtol=1e-5)


def test_packed_segments_equal_separate_rows():
  model = _vlm("softmax")
  image = _images(1)
  segs = [[1, 40, 41, 42, 3], [1, 50, 51, 3], [1, 60, 61, 62, 63, 64, 3]]
  tokens = np.concatenate(segs + [[ByteTokenizer.pad_id] * 4])[None]
  seg_ids = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(segs)] + [[-1] * 4])[None]
  pos = np.concatenate([np.arange(len(s)) for s in segs] + [[0] * 4])[None]
  logits = _fwd(model, jnp.asarray(tokens), image=image, segment_ids=jnp.asarray(seg_ids),
                positions=jnp.asarray(pos))[0]
  at = 0
  for s in segs:
    alone = _fwd(model, jnp.asarray([s]), image=image)[0]
    np.testing.assert_allclose(logits[at:at + len(s)], alone, atol=2e-5, rtol=1e-5)
    at += len(s)
  # ...and without segment ids the segments would see each other: the check can fail.
  leaky = _fwd(model, jnp.asarray(tokens), image=image, positions=jnp.asarray(pos))[0]
  assert not np.allclose(leaky[len(segs[0]):len(segs[0]) + len(segs[1])],
                         logits[len(segs[0]):len(segs[0]) + len(segs[1])], atol=1e-4)


def _decode_masked(row):
  tok = ByteTokenizer()
  return tok.decode(row["targets"][row["loss_mask"] > 0])


def test_encode_vqa_row_layout():
  tok = ByteTokenizer()
  ex = Example(np.zeros((4, 4, 3), np.uint8), "how many circles?", "2", "vqa")
  row = encode_vqa(ex, tok, prompt_len=24, target_len=8)
  assert _decode_masked(row) == "2"
  assert row["targets"][row["loss_mask"] > 0][-1] == tok.eos_id
  real = row["segment_ids"] == 1
  # Real input tokens are exactly <bos> question <sep> answer <eos>.
  expected = tok.encode("how many circles?", bos=True) + [tok.sep_id] + tok.encode("2") + [tok.eos_id]
  assert row["inputs"][real].tolist() == expected
  assert row["positions"][real].tolist() == list(range(len(expected)))
  assert tok.decode(row["prompt"]) == "how many circles?"


def test_encode_packed_row_layout():
  tok = ByteTokenizer()
  img = np.ones((4, 4, 3), np.uint8)
  tasks = [Example(img, "caption:", "a red square", "caption"),
           Example(img, "what color is the square?", "red", "vqa")]
  row = encode_packed(tasks, tok, prompt_len=40, target_len=60, packed_len=64)
  for i, ex in enumerate(tasks):
    in_seg = row["segment_ids"] == i + 1
    assert row["positions"][in_seg].tolist() == list(range(in_seg.sum()))
    # the masked labels inside this segment spell the target and end with <eos>
    labels = row["targets"][in_seg & (row["loss_mask"] > 0)]
    assert tok.decode(labels) == ex.target and labels[-1] == tok.eos_id
  assert (row["loss_mask"][row["segment_ids"] == -1] == 0).all()
  # A row too short for the second task keeps only the first.
  short = encode_packed(tasks, tok, prompt_len=40, target_len=60, packed_len=30)
  assert set(short["segment_ids"].tolist()) == {1, -1}


def test_pack_requires_softmax_attention():
  c = base_config()
  c.model = model_section("tiny", attention="linear", max_seq_len=128,
                          vision=vision_section(kind="cnn", image_size=16, cnn_channels=(8, 8),
                                                width=16))
  c.data.pack = True
  with pytest.raises(ValueError, match="data.pack"):
    validate(c)
