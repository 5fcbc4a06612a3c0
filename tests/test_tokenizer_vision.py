"""WordTokenizer (words + byte fallback) and the CNN encoder's pool schedule / global token,
each checked against an independent reference (a hand-written tokenization, a NumPy CNN)."""
import numpy as np
import pytest
from flax import nnx

import gptjax
from gptjax.data.builders.shapes import shapes as shapes_lib
from gptjax.data.tokenizers import ByteTokenizer, WordTokenizer, make_tokenizer
from gptjax.init import compiled_init
from gptjax.vision import CNNEncoder


# ------------------------------------------------------------------------- tokenizer
def test_word_tokenizer_known_split():
  tok = WordTokenizer(["a", "red", "circle", "how", "many"])
  ids = tok.encode("a red circle, how many circles?", bos=True, eos=True)
  names = [tok.token_name(i) for i in ids]
  # Written out by hand: words (with their leading space) are single tokens, the plural
  # is the singular's token + "s", punctuation falls back to bytes.
  assert names == ["<bos>", "a", " red", " circle", ",", " how", " many", " circle", "s",
                   "?", "<eos>"]
  assert tok.decode(ids) == "a red circle, how many circles?"
  assert ids[0] == ByteTokenizer.bos_id and ids[-1] == ByteTokenizer.eos_id


def test_word_tokenizer_ids_and_vocab_size():
  tok = WordTokenizer(["red", "blue", "red"])  # duplicates are ignored
  base = ByteTokenizer.vocab_size
  assert tok.vocab_size == base + 4
  assert tok.encode("red") == [base] and tok.encode(" red") == [base + 1]
  assert tok.encode(" blue") == [base + 3]
  # Specials keep the byte tokenizer's ids: pipelines and the sampler rely on them.
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (
      ByteTokenizer.pad_id, ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.sep_id)


def test_word_tokenizer_round_trips_random_text():
  tok = make_tokenizer("shapes")
  rng = np.random.default_rng(0)
  alphabet = list("abcdefghijklmnopqrstuvwxyz   ,.?!\n\t0123") + ["é", "ß", "日", "🙂"]
  words = list(shapes_lib.vocabulary()) + ["circles", "isthe", "reds"]
  for _ in range(300):
    parts = [rng.choice(words) if rng.random() < 0.5 else rng.choice(alphabet)
             for _ in range(int(rng.integers(0, 20)))]
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_word_tokenizer_shortens_shapes_text():
  byte, word = ByteTokenizer(), make_tokenizer("shapes")
  cap = shapes_lib.caption_for([0, 1, 2], [0, 1, 2])
  assert len(word.encode(cap)) * 3 < len(byte.encode(cap))
  for q in ("what color is the square?", "how many triangles?", "is the circle left of the square?"):
    assert byte.decode(byte.encode(q)) == word.decode(word.encode(q)) == q
    # Every word of every question is one token (plurals: the singular + "s").
    assert len(word.encode(q)) <= len(q.split()) + 2


def test_tokenizer_bad_input():
  with pytest.raises(ValueError, match="tokenizer 'bpe' is invalid.*'byte', 'shapes'"):
    make_tokenizer("bpe")
  with pytest.raises(ValueError, match="word 'two words' is invalid"):
    WordTokenizer(["two words"])
  with pytest.raises(TypeError, match="expects str"):
    make_tokenizer("shapes").encode(b"bytes")


# ------------------------------------------------------------------- cnn encoder
def _np_conv_same(x, k, b):
  """3x3 (or 1x1) 'SAME' convolution, NHWC, written with explicit loops over the taps."""
  kh, kw = k.shape[:2]
  ph, pw = kh // 2, kw // 2
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (k.shape[3],), np.float64)
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,cd->bhwd", xp[:, i:i + h, j:j + w], k[i, j])
  return out + b


def _np_pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("pools,global_token", [(None, False), (1, False), (1, True), (0, True)])
def test_cnn_encoder_matches_numpy(pools, global_token):
  cfg = gptjax.VisionConfig(kind="cnn", image_size=8, cnn_channels=(4, 6), cnn_pools=pools,
                            width=5, global_token=global_token)
  enc = CNNEncoder(cfg, dtype=np.float32, param_dtype=np.float32, rngs=nnx.Rngs(0))
  image = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
  got = np.asarray(enc(image))
  x = image.astype(np.float64) * 2 - 1
  n_pools = 2 if pools is None else pools
  for j, conv in enumerate(enc.convs):
    x = np.maximum(_np_conv_same(x, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])), 0)
    if j < n_pools:
      x = _np_pool(x)
  x = _np_conv_same(x, np.asarray(enc.out.kernel[...]), np.asarray(enc.out.bias[...]))
  grid = 8 // 2**n_pools
  want = x.reshape(2, grid * grid, 5)
  if global_token:
    want = np.concatenate([want, want.max(axis=1, keepdims=True)], axis=1)
  assert got.shape == (2, cfg.num_tokens, 5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_global_token_feeds_vlm():
  vision = gptjax.VisionConfig(kind="vit", image_size=16, patch_size=8, width=16, depth=1,
                               num_heads=2, mlp_dim=16, global_token=True)
  cfg = gptjax.preset("tiny", vision=vision, max_seq_len=32)
  model = compiled_init(lambda: gptjax.VLM(cfg, rngs=nnx.Rngs(0)))
  image = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
  tokens = model.vision(image)
  assert tokens.shape == (2, 5, 16)  # 2x2 patches + the global token
  np.testing.assert_allclose(np.asarray(tokens[:, -1]), np.asarray(tokens[:, :-1]).max(1),
                             rtol=0, atol=0)
  logits = model(np.zeros((2, 4), np.int32), image)
  assert logits.shape == (2, 4, cfg.vocab_size)


def test_cnn_pos_embed_is_2d_sincos_on_grid_tokens_only():
  kw = dict(kind="cnn", image_size=16, cnn_channels=(4, 4), width=8, global_token=True)
  with_pos = CNNEncoder(gptjax.VisionConfig(**kw, cnn_pos_embed=True), dtype=np.float32,
                        param_dtype=np.float32, rngs=nnx.Rngs(0))
  plain = CNNEncoder(gptjax.VisionConfig(**kw), dtype=np.float32, param_dtype=np.float32,
                     rngs=nnx.Rngs(0))
  image = np.random.default_rng(2).random((2, 16, 16, 3)).astype(np.float32)
  diff = np.asarray(with_pos(image)) - np.asarray(plain(image))
  np.testing.assert_allclose(diff[:, -1], 0.0, atol=1e-6)  # the global token: no position
  grid, q = 4, 2
  for r in range(grid):
    for col in range(grid):
      freqs = [1.0 / 10_000 ** (j / q) for j in range(q)]
      want = ([np.sin(col * f) for f in freqs] + [np.cos(col * f) for f in freqs]
              + [np.sin(r * f) for f in freqs] + [np.cos(r * f) for f in freqs])
      np.testing.assert_allclose(diff[0, r * grid + col], want, atol=1e-5)


def test_cnn_pos_embed_needs_width_divisible_by_4():
  with pytest.raises(ValueError, match="width"):
    gptjax.VisionConfig(kind="cnn", width=10, cnn_pos_embed=True)
