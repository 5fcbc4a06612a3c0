"""Image-text matching: a (B_img, B_txt) score for every image against every candidate text.

Two methods:
- ``generative`` (any VLM): the length-normalised log-likelihood of the text as the
  *caption* of the image — the same token layout as the pipeline's caption task
  (``<bos> caption: <sep> text <eos>``, built by ``gptjax.data.pipeline.encode_vqa``), the
  mean log-probability over the text's tokens and ``<eos>`` (the tokens the caption loss was
  trained on). Each image is encoded once; its image tokens are tiled over a block of texts,
  and the grid is scored in blocks of at most ``max_rows`` decoder rows, so memory is bounded
  whatever the grid size.
- ``contrastive`` (a VLM with a contrastive head, ``ModelConfig.contrastive_dim`` > 0): the
  cosine similarity of the head's unit image and text embeddings (the ranking the SigLIP
  logits t * cos + b give, without the monotone map).

Every jitted function here is a function of the model passed in (``nnx.jit``); blocks have
a fixed shape (the last one padded), so a grid compiles once per shape.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.batch import image_to_float, token_losses
from gptjax.data.pipeline import CAPTION_PROMPT, Example, encode_caption, encode_vqa
from gptjax.data.tokenizers import ByteTokenizer
from gptjax.model import VLM

METHODS = ("generative", "contrastive")
# Rows (image, text pairs) per decoder call; lowered so a block's logits stay <= ~256 MiB.
MAX_ROWS = 512
_LOGIT_BUDGET = 64 * 2**20  # float32 elements of one block's (rows, T, V) logits
_TEXT_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def caption_rows(texts: Sequence[str], tokenizer=None) -> dict:
  """The caption-task rows of ``texts``: (M, T) ``inputs``/``targets``/``loss_mask``/
  ``segment_ids``/``positions`` exactly as the vqa pipeline lays out a caption task, with the
  prompt left-padded to its own length and the targets right-padded to the longest text."""
  tok = tokenizer or ByteTokenizer()
  prompt_len = len(tok.encode(CAPTION_PROMPT, bos=True)) + 1  # + <sep>
  target_len = max(len(tok.encode(t)) + 1 for t in texts)  # + <eos>
  rows = [encode_vqa(Example(None, CAPTION_PROMPT, t, "caption"), tok, prompt_len, target_len)
          for t in texts]
  return {k: np.stack([r[k] for r in rows]) for k in _TEXT_KEYS}


@nnx.jit
def _encode_images(model, image):
  return model.encode_image(image_to_float(image))


@nnx.jit
def _score_block(model, prefix, rows):
  """prefix (I, P, D) image tokens x rows (J, T) caption rows -> (I, J) mean log-likelihood
  of each caption's target tokens given each image."""
  n_img, n_txt = prefix.shape[0], rows["inputs"].shape[0]
  tile = lambda x: jnp.tile(x, (n_img, 1))  # noqa: E731  row i*J + j: image i, text j
  rows = {k: tile(v) for k, v in rows.items()}
  logits = model.decoder(rows["inputs"], prefix=jnp.repeat(prefix, n_txt, axis=0),
                         segment_ids=rows["segment_ids"], positions=rows["positions"])
  return _mean_log_likelihood(logits, rows).reshape(n_img, n_txt)


@nnx.jit
def _score_block_via_call(model, images, rows):
  """``_score_block`` through ``model.__call__`` (the image encoded once per row): for
  models that compute only there (``through_call_only``)."""
  n_img, n_txt = images.shape[0], rows["inputs"].shape[0]
  tile = lambda x: jnp.tile(x, (n_img, 1))  # noqa: E731  row i*J + j: image i, text j
  rows = {k: tile(v) for k, v in rows.items()}
  logits = model(rows["inputs"], jnp.repeat(image_to_float(images), n_txt, axis=0),
                 segment_ids=rows["segment_ids"], positions=rows["positions"])
  return _mean_log_likelihood(logits, rows).reshape(n_img, n_txt)


@nnx.jit
def _score_pairs(model, prefix, rows):
  """prefix (B, P, D) image tokens and rows (B, T): row b's caption given image b -> (B,)."""
  logits = model.decoder(rows["inputs"], prefix=prefix, segment_ids=rows["segment_ids"],
                         positions=rows["positions"])
  return _mean_log_likelihood(logits, rows)


@nnx.jit
def _score_pairs_via_call(model, images, rows):
  logits = model(rows["inputs"], image_to_float(images), segment_ids=rows["segment_ids"],
                 positions=rows["positions"])
  return _mean_log_likelihood(logits, rows)


def _mean_log_likelihood(logits, rows):
  """(R,) mean log-probability of each row's target tokens (its ``loss_mask``)."""
  mask = rows["loss_mask"].astype(jnp.float32)
  ll = -token_losses(logits, rows["targets"])
  return jnp.sum(ll * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def through_call_only(model) -> bool:
  """True for a VLM whose class overrides ``__call__`` (qwix's quantized and QAT models:
  they run with the quantized ops intercepted inside ``__call__`` only, so ``encode_image``
  or ``decoder`` called directly would see raw quantized arrays). Generative scoring then
  encodes each image per row through ``__call__``; the contrastive head is unavailable."""
  return isinstance(model, VLM) and type(model).__call__ is not VLM.__call__


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """``x`` with its first row repeated up to ``n`` rows (a fixed block shape)."""
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])


def _check(model, images, texts) -> np.ndarray:
  if not hasattr(model, "encode_image"):
    raise ValueError(f"model is a {type(model).__name__}: matching images with texts needs a "
                     "VLM (ModelConfig.vision set)")
  if isinstance(texts, str) or not len(texts) or not all(isinstance(t, str) for t in texts):
    raise ValueError(f"texts={texts!r:.80} is invalid: expected a non-empty sequence of str")
  images = np.asarray(images)
  if images.ndim != 4 or not len(images):
    raise ValueError(f"images shape {images.shape} is invalid: expected (B_img, H, W, C) "
                     "with B_img >= 1, uint8 or float in [0, 1]")
  return images


def image_tokens(model, images, *, block: int = 64) -> jnp.ndarray:
  """(N, P, D) projected image tokens of ``images`` (N, H, W, C), encoded in blocks."""
  images = np.asarray(images)
  block = min(block, len(images))
  out = []
  for s in range(0, len(images), block):
    chunk = images[s:s + block]
    out.append(_encode_images(model, _pad_rows(chunk, block))[:len(chunk)])
  return jnp.concatenate(out)


def generative_scores(model, images, texts: Sequence[str], tokenizer=None, *,
                      max_rows: int = MAX_ROWS) -> np.ndarray:
  """(N, M) mean log-likelihood of each text as each image's caption (see module doc)."""
  images = _check(model, images, texts)
  model.eval()
  rows = caption_rows(texts, tokenizer)
  n_txt, t = rows["inputs"].shape
  cfg = model.config
  if t > cfg.max_seq_len:
    raise ValueError(f"the longest text needs {t} caption-task tokens > "
                     f"ModelConfig.max_seq_len={cfg.max_seq_len}")
  max_rows = max(1, min(max_rows, _LOGIT_BUDGET // max(t * cfg.vocab_size, 1)))
  tb = min(n_txt, max_rows)  # texts per block
  ib = max(1, min(len(images), max_rows // tb))  # images per block
  via_call = through_call_only(model)
  prefix = jnp.asarray(images) if via_call else image_tokens(model, images)
  score = _score_block_via_call if via_call else _score_block
  out = np.zeros((len(images), n_txt), np.float32)
  for j in range(0, n_txt, tb):
    block = {k: jnp.asarray(_pad_rows(v[j:j + tb], tb)) for k, v in rows.items()}
    nj = min(tb, n_txt - j)
    for i in range(0, len(images), ib):
      p = prefix[i:i + ib]
      ni = p.shape[0]
      if ni < ib:
        p = jnp.concatenate([p, jnp.repeat(p[:1], ib - ni, axis=0)])
      out[i:i + ni, j:j + nj] = np.asarray(score(model, p, block))[:ni, :nj]
  return out


def paired_scores(model, images, texts: Sequence[str], tokenizer=None, *,
                  block: int = 64) -> np.ndarray:
  """(N,) mean log-likelihood of ``texts[i]`` as the caption of ``images[i]``: the diagonal
  of ``generative_scores`` without the rest of the grid (e.g. to rank many drawings, each
  against its own prompt), in blocks of ``block`` pairs."""
  images = _check(model, images, texts)
  if len(images) != len(texts):
    raise ValueError(f"paired_scores needs one text per image: got {len(images)} images and "
                     f"{len(texts)} texts")
  model.eval()
  rows = caption_rows(texts, tokenizer)
  if rows["inputs"].shape[1] > model.config.max_seq_len:
    raise ValueError(f"the longest text needs {rows['inputs'].shape[1]} caption-task tokens > "
                     f"ModelConfig.max_seq_len={model.config.max_seq_len}")
  via_call = through_call_only(model)
  score = _score_pairs_via_call if via_call else _score_pairs
  b = min(block, len(images))
  out = []
  for s in range(0, len(images), b):
    n = min(b, len(images) - s)
    chunk = _pad_rows(images[s:s + n], b)
    prefix = jnp.asarray(chunk) if via_call else _encode_images(model, chunk)
    part = {k: jnp.asarray(_pad_rows(v[s:s + n], b)) for k, v in rows.items()}
    out.append(np.asarray(score(model, prefix, part))[:n])
  return np.concatenate(out).astype(np.float32)


@nnx.jit
def _image_embeddings(model, image):
  return model.image_embedding(image_to_float(image))


@nnx.jit
def _text_embeddings(model, ids, lengths):
  return model.text_embedding(ids, lengths)


def caption_ids(texts: Sequence[str], tokenizer=None, length: Optional[int] = None):
  """(M, L) right-padded ``text <eos>`` ids and (M,) lengths, as the pipeline's
  ``caption_ids`` (``encode_caption``); L defaults to the longest text's."""
  tok = tokenizer or ByteTokenizer()
  length = length or max(len(tok.encode(t)) + 1 for t in texts)
  pairs = [encode_caption(t, tok, length) for t in texts]
  return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.int32)


def contrastive_scores(model, images, texts: Sequence[str], tokenizer=None, *,
                       block: int = 64) -> np.ndarray:
  """(N, M) cosine similarity of the contrastive head's image and text embeddings."""
  images = _check(model, images, texts)
  if through_call_only(model):
    raise ValueError(f"method='contrastive' is not available for a {type(model).__name__} "
                     "(a quantized model computes only through __call__): use "
                     "method='generative', or the float model")
  model._head()  # a clear error without a head, before any compile
  model.eval()
  ids, lens = caption_ids(texts, tokenizer)
  if ids.shape[1] > model.config.max_seq_len:
    raise ValueError(f"the longest text needs {ids.shape[1]} tokens > "
                     f"ModelConfig.max_seq_len={model.config.max_seq_len}")

  def embed(fn, *arrays):
    n = len(arrays[0])
    b = min(block, n)
    out = []
    for s in range(0, n, b):
      chunk = [a[s:s + b] for a in arrays]
      out.append(np.asarray(fn(model, *[_pad_rows(a, b) for a in chunk]))[:len(chunk[0])])
    return np.concatenate(out)

  x = embed(_image_embeddings, images)
  y = embed(_text_embeddings, ids, lens)
  return (x @ y.T).astype(np.float32)


def match(model, images, texts: Sequence[str], method: str = "generative",
          tokenizer=None) -> np.ndarray:
  """Scores (B_img, B_txt) of every image (B_img, H, W, C; uint8 or float in [0, 1])
  against every text (str), higher = better match.

  ``method``: 'generative' (caption log-likelihood, any VLM) or 'contrastive' (the
  contrastive head's cosine similarity; needs ``ModelConfig.contrastive_dim`` > 0).
  ``tokenizer``: the one the model was trained with (default bytes). The model is put in
  eval mode (no dropout).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is invalid: allowed values are "
                     f"{', '.join(map(repr, METHODS))}")
  if method == "contrastive":
    return contrastive_scores(model, images, texts, tokenizer)
  return generative_scores(model, images, texts, tokenizer)
