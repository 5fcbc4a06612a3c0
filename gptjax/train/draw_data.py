"""The draw task's training data: the image tokenizer of a run, and training batches that mix
draw rows (caption -> image codes) into the vqa rows.

``prepare`` runs before LM training: it loads ``<workdir>/image_codes/`` (a resumed run, so
the codes the decoder learnt stay the same) or trains the tokenizer on the training split's
images and saves it there first, then encodes the split once. ``pipeline`` then builds the
training batches: vqa rows and draw rows, each shuffled with its own seed and repeated,
mixed row by row at ``draw.rows_fraction`` (``grain.MapDataset.mix``), then sharded per
process and batched — still one random-access ``MapDataset``, so its iterator state (a
position) is checkpointed and restored like the plain pipeline's.

Packing (``data.pack``): a draw row is padded to ``packed_len`` as a row of its own rather
than packed next to vqa tasks, because a packed row has one image that all of its segments
see, and a draw row must carry a blank image (its codes have to come from the caption, not
from a picture of the answer); packing several draw rows together would save padding but
makes the draw share depend on caption lengths.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import grain
import jax
import numpy as np

from gptjax.data.pipeline import (DrawSource, Pipeline, TaskSource, batch_iterator, draw_dataset,
                                  encode_caption, encode_packed, encode_vqa, tasks_per_record)
from gptjax.layers.attention import PAD_SEGMENT
from gptjax.tasks import image_codes as ic
from gptjax.tasks import image_codes_store as ic_store
from gptjax.tasks.drawing import DrawTokens, draw_tokens
from gptjax.train.config import fail, image_codes_config, tokenizer_for

log = logging.getLogger("gptjax")

CODES_DIR = "image_codes"


@dataclasses.dataclass
class DrawData:
  """A run's image tokenizer, the id layout of its codes and the train split's codes."""
  model: ic.ImageCodes
  layout: DrawTokens
  codes: Optional[np.ndarray] = None  # (N, G*G) int32, record i of the train split
  trained: bool = False  # True: trained by this call of ``prepare`` (not loaded)
  reconstruction: Optional[dict] = None


def enabled(c) -> bool:
  return c.get("draw") is not None and bool(c.draw.enabled)


def layout_for(c, codes_model: ic.ImageCodes, tok=None) -> DrawTokens:
  return draw_tokens((tok or tokenizer_for(c)).vocab_size, codes_model.config.codebook_size)


def _images(source, key: str) -> np.ndarray:
  return np.stack([np.asarray(source[i][key]) for i in range(len(source))])


def _check_prompts(c, source, tok) -> None:
  """Every caption of ``source`` fits a draw prompt (``<bos> caption <img>``), checked once
  here, not as a failure deep inside the input pipeline mid-run."""
  key = c.data.caption_key
  need = max(len(tok.encode(_text(source[i][key]), bos=True)) + 1 for i in range(len(source)))
  if need > c.data.prompt_len:
    fail("data.prompt_len", c.data.prompt_len, f"must be >= {need} with draw.enabled: the "
         f"longest draw prompt, <bos> caption <img>, of the {len(source)} training captions")


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def prepare(c, workdir: str, train_source, *, progress: Optional[bool] = None) -> DrawData:
  """The run's image tokenizer (loaded from ``<workdir>/image_codes`` or trained on
  ``train_source``'s images and saved there atomically) and the train split's codes."""
  want = image_codes_config(c)
  path = os.path.join(workdir, CODES_DIR)
  tok = tokenizer_for(c)
  _check_prompts(c, train_source, tok)
  trained, recon = False, None
  if os.path.exists(os.path.join(path, ic_store.CONFIG_FILE)):
    model = ic_store.load(path)
    if model.config != want:
      fail("draw.codes", c.draw.codes.to_dict(), f"differs from the image tokenizer this run "
           f"already trained ({path}: {model.config}); the decoder learnt its codes, so a "
           "resumed run must keep it (or start a new workdir)")
    log.info("draw: loaded the image tokenizer from %s", path)
  else:
    images = _images(train_source, c.data.image_key)
    show = c.logging.progress if progress is None else progress
    model, info = ic.train_image_codes(
        images, want, steps=c.draw.codes.steps, batch_size=c.draw.codes.batch_size,
        seed=c.seed, progress=bool(show) and jax.process_index() == 0)
    recon = ic.reconstruction_error(model, images[:2048])
    if jax.process_index() == 0:  # every process trained the same model (same seed, data)
      ic_store.save(model, want, path)
    trained = True
    log.info("draw: image tokenizer trained in %.1f s (%d steps), saved to %s; train "
             "reconstruction: %s", info["seconds"], info["steps"], path,
             ", ".join(f"{k}={v:.4f}" for k, v in recon.items()))
  layout = layout_for(c, model, tok)
  codes = ic.encode_source(model, train_source, image_key=c.data.image_key)
  return DrawData(model, layout, codes, trained, recon)


def load_image_codes(workdir: str) -> ic.ImageCodes:
  """The image tokenizer a draw run trained (``<workdir>/image_codes``)."""
  path = os.path.join(os.path.expanduser(workdir), CODES_DIR)
  if not os.path.isdir(path):
    raise ValueError(f"workdir={workdir!r} has no {CODES_DIR}/: not a run trained with "
                     "config.draw.enabled=True")
  return ic_store.load(path)


def _conform(row: dict, like: dict, tok) -> dict:
  """A draw row with exactly the keys and shapes of the vqa row ``like``: arrays padded on
  the right to its length (pad id, no loss, the padding segment), keys it lacks dropped,
  caption keys (contrastive) empty so the row takes no part in that loss."""
  t = like["inputs"].shape[0]
  fill = {"inputs": tok.pad_id, "targets": tok.pad_id, "loss_mask": 0.0,
          "segment_ids": PAD_SEGMENT, "positions": 0}
  out = {}
  for k, ref in like.items():
    if k in fill:
      x = row[k]
      out[k] = np.concatenate([x, np.full(t - len(x), fill[k], x.dtype)]) if len(x) < t else x
    elif k == "caption_ids":
      out[k] = np.full_like(ref, tok.pad_id)
    elif k == "caption_len":
      out[k] = np.int32(0)
    else:
      out[k] = row[k]
  return out


def _vqa_rows(c, source, tok, captions: bool):
  """The vqa rows of ``make_pipeline`` (unshuffled, unbatched)."""
  d = c.data

  def add_caption(out, tasks):
    if not captions:
      return out
    cap = next((ex for ex in tasks if ex.kind == "caption"), None)
    ids, n = ((np.full(d.target_len, tok.pad_id, np.int32), np.int32(0)) if cap is None
              else encode_caption(cap.target, tok, d.target_len))
    out.update(caption_ids=ids, caption_len=n)
    return out

  if d.pack:
    ds = grain.MapDataset.source(TaskSource(source, 1, lambda r: [tasks_per_record(r)], d.name))
    return ds.map(lambda tasks: add_caption(
        encode_packed(tasks, tok, d.prompt_len, d.target_len, d.packed_len), tasks))
  n_tasks = len(tasks_per_record(source[0]))
  ds = grain.MapDataset.source(TaskSource(source, n_tasks, tasks_per_record, d.name))
  return ds.map(lambda ex: add_caption(encode_vqa(ex, tok, d.prompt_len, d.target_len), [ex]))


def pipeline(c, source, draw: DrawData, *, batch_size: int, seed_offset: int = 0,
             process_index: Optional[int] = None, process_count: Optional[int] = None
             ) -> Pipeline:
  """Training batches of ``source``: vqa rows mixed with draw rows at ``draw.rows_fraction``
  (see the module docstring), every row of the same keys and length."""
  tok = tokenizer_for(c)
  d = c.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if batch_size % pc:
    raise ValueError(f"batch_size={batch_size} must divide by the {pc} processes")
  captions = d.task == "vqa" and c.train.get("contrastive_weight", 0.0) > 0
  vqa = _vqa_rows(c, source, tok, captions)
  like = vqa[0]
  rows = draw_dataset(
      DrawSource(source, draw.codes, caption_key=d.caption_key, uncond_prob=c.draw.uncond_prob,
                 seed=c.seed, name=f"{d.name}-draw"),
      tok, img_id=draw.layout.img_id, code_offset=draw.layout.code_offset,
      prompt_len=d.prompt_len, target_len=d.target_len,
      image_shape=like["image"].shape if "image" in like else None)
  rows = rows.map(lambda r: _conform(r, like, tok))
  seed = c.seed + seed_offset
  num_examples = len(vqa) + len(rows)
  f = float(c.draw.rows_fraction)
  ds = grain.MapDataset.mix([vqa.shuffle(seed=seed).repeat(None),
                             rows.shuffle(seed=seed + 1).repeat(None)], weights=[1 - f, f])
  ds = ds[pi::pc]
  ds = ds.batch(batch_size // pc, drop_remainder=True)
  return Pipeline(ds, batch_iterator(ds), num_examples)
