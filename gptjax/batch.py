"""The batch layout, in one place: which keys a batch has, how a batch calls a model, the
loss on a batch, and how a host batch becomes global device arrays.

A batch is a dict of arrays, rows first:

  inputs       (B, T) int32    token ids the model reads
  targets      (B, T) int32    next-token ids (inputs shifted by one)
  loss_mask    (B, T) float32  1 where a target counts (e.g. the answer, not the prompt)
  image        (B, H, W, C)    uint8 (4x cheaper to move to a device than float32; scaled
                               to [0, 1] inside the jitted step) — VLM rows only
  segment_ids  (B, T) int32    padded / packed rows: ids >= 1 are separate sequences,
                               PAD_SEGMENT marks padding (never attended)
  positions    (B, T) int32    text positions (restarting in every packed segment)
  prompt       (B, T_p) int32  vqa rows: the left-padded prompt, for greedy decoding
  is_caption   (B,) int32      vqa rows: 1 for a caption task, 0 for a question
  caption_ids  (B, L) int32    vqa rows, when the contrastive loss is on: the image's caption
                               as ``caption <eos>`` tokens, right-padded (pad id) to
                               L = data.target_len — the text tower's input
  caption_len  (B,) int32      its real tokens; 0 for a row without a caption (an unpacked
                               question row), which then takes no part in the contrastive loss
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import sharding as shd
from gptjax.layers.attention import PAD_SEGMENT, SHARED_SEGMENT  # noqa: F401  (re-exported)

# What a train / eval step reads (the rest stays on the host).
MODEL_KEYS = ("inputs", "targets", "loss_mask", "image", "segment_ids", "positions",
              "caption_ids", "caption_len")
# What greedy decoding of vqa rows reads in addition.
DECODE_KEYS = ("prompt", "is_caption")
BATCH_KEYS = MODEL_KEYS + DECODE_KEYS


def model_batch(batch: Mapping[str, Any]) -> dict:
  """Only the keys a step reads (``MODEL_KEYS``)."""
  return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def image_to_float(image) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]; float images are passed through."""
  image = jnp.asarray(image)
  if jnp.issubdtype(image.dtype, jnp.integer):
    return image.astype(jnp.float32) / 255.0
  return image


def model_args(batch: Mapping[str, Any]) -> tuple[tuple, dict]:
  """(args, kwargs) of ``model(...)`` for a batch: ``(inputs,)`` and the image (as float),
  segment ids and positions when present. Other keys (targets, ...) are ignored."""
  if "inputs" not in batch:
    raise ValueError(f"batch has keys {sorted(batch)}: expected 'inputs' (B, T) int32 "
                     "token ids and optionally 'image' (B, H, W, C) uint8")
  kwargs = {k: jnp.asarray(batch[k]) for k in ("segment_ids", "positions")
            if batch.get(k) is not None}
  if batch.get("image") is not None:
    kwargs["image"] = image_to_float(batch["image"])
  return (jnp.asarray(batch["inputs"]),), kwargs


_INT_KEYS = ("inputs", "targets", "segment_ids", "positions")


def _concrete(x) -> bool:
  if isinstance(x, jax.core.Tracer):
    return False
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def _bad(key: str, x, expected: str) -> ValueError:
  return ValueError(f"batch[{key!r}] with shape {tuple(np.shape(x))} and dtype "
                    f"{getattr(x, 'dtype', type(x).__name__)} is invalid: expected {expected}")


def check_batch(batch: Mapping[str, Any], model_config=None) -> None:
  """Raise ``ValueError`` naming the key if ``batch`` does not fit the layout above (and
  ``model_config``, a ``gptjax.config.ModelConfig``, when given): ranks, dtypes, matching
  (B, T), the image size, T <= max_seq_len and, for concrete (host / addressable) arrays,
  token ids in [0, vocab_size). Shape checks also work on tracers (inside jit they fail at
  trace time, named, instead of as an XLA shape error); value checks then are skipped.
  NaN pixels are not rejected: the train step's non-finite guard handles bad values."""
  if not isinstance(batch, Mapping):
    raise TypeError(f"batch is a {type(batch).__name__}: expected a dict of arrays with keys "
                    f"{MODEL_KEYS}")
  arrays = {k: (v if hasattr(v, "dtype") else np.asarray(v)) for k, v in batch.items()
            if k in MODEL_KEYS and v is not None}
  if "inputs" not in arrays:
    raise ValueError(f"batch has keys {sorted(batch)}: expected 'inputs' (B, T) int32 "
                     "token ids and optionally 'image' (B, H, W, C) uint8")
  inputs = arrays["inputs"]
  for k in _INT_KEYS + ("loss_mask",):
    if k not in arrays:
      continue
    x = arrays[k]
    if x.ndim != 2 or (k != "inputs" and tuple(x.shape) != tuple(inputs.shape)):
      raise _bad(k, x, f"(B, T) = {tuple(inputs.shape) if inputs.ndim == 2 else '(B, T)'}"
                 " like batch['inputs']")
    if k in _INT_KEYS and not jnp.issubdtype(x.dtype, jnp.integer):
      raise _bad(k, x, "an integer dtype (int32)")
    if k == "loss_mask" and not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == bool):
      raise _bad(k, x, "a numeric dtype (float32 0/1)")
  b, t = inputs.shape
  if "image" in arrays:
    x = arrays["image"]
    vision = getattr(model_config, "vision", None) if model_config is not None else None
    if model_config is not None and vision is None:
      raise _bad("image", x, "no image: the model has no vision encoder (model.vision=None)")
    want = ((vision.image_size, vision.image_size, vision.channels) if vision is not None
            else None)
    if (x.ndim != 4 or x.shape[0] != b or not jnp.issubdtype(x.dtype, jnp.number)
        or (want is not None and tuple(x.shape[1:]) != want)):
      hwc = "H, W, C" if want is None else ", ".join(map(str, want))
      raise ValueError(f"batch['image']: image shape {tuple(x.shape)} (dtype {x.dtype}) is "
                       f"invalid: expected (B, {hwc}) with B={b} rows like batch['inputs'], "
                       "uint8 or float")
  _check_captions(arrays, b, model_config)
  if model_config is None:
    return
  if t > model_config.max_seq_len:
    raise _bad("inputs", inputs, f"T <= model.max_seq_len={model_config.max_seq_len} text "
               "tokens")
  vocab = model_config.vocab_size
  for k, hi, what in (("inputs", vocab, "vocab_size"), ("targets", vocab, "vocab_size"),
                      ("positions", model_config.max_seq_len, "max_seq_len")):
    x = arrays.get(k)
    if x is None or not _concrete(x) or not x.size:
      continue
    x = np.asarray(x)
    if x.min() < 0 or x.max() >= hi:
      raise ValueError(f"batch[{k!r}] contains values outside [0, {what}={hi}): "
                       f"min={x.min()}, max={x.max()}")


def _check_captions(arrays: Mapping[str, Any], b: int, model_config) -> None:
  """``caption_ids`` (B, L) int and ``caption_len`` (B,) int in [0, L] come together."""
  ids, lens = arrays.get("caption_ids"), arrays.get("caption_len")
  if ids is None and lens is None:
    return
  if ids is None or lens is None:
    have, miss = ("caption_ids", "caption_len") if lens is None else ("caption_len",
                                                                       "caption_ids")
    raise ValueError(f"batch has {have!r} but not {miss!r}: the contrastive text tower needs "
                     "both (right-padded caption tokens and their lengths)")
  if ids.ndim != 2 or ids.shape[0] != b or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise _bad("caption_ids", ids, f"(B, L) integer token ids with B={b} rows like "
               "batch['inputs']")
  if lens.ndim != 1 or lens.shape[0] != b or not jnp.issubdtype(lens.dtype, jnp.integer):
    raise _bad("caption_len", lens, f"(B,) = ({b},) integer lengths")
  if model_config is not None and ids.shape[1] > model_config.max_seq_len:
    raise _bad("caption_ids", ids, f"L <= model.max_seq_len={model_config.max_seq_len}")
  if _concrete(lens) and lens.size:
    n = np.asarray(lens)
    if n.min() < 0 or n.max() > ids.shape[1]:
      raise ValueError(f"batch['caption_len'] contains values outside [0, L={ids.shape[1]}]: "
                       f"min={n.min()}, max={n.max()}")
  if model_config is not None and _concrete(ids) and ids.size:
    x = np.asarray(ids)
    if x.min() < 0 or x.max() >= model_config.vocab_size:
      raise ValueError(f"batch['caption_ids'] contains values outside [0, vocab_size="
                       f"{model_config.vocab_size}): min={x.min()}, max={x.max()}")


def forward(model, batch: Mapping[str, Any], *, return_hidden: bool = False,
            image_tokens: Optional[jax.Array] = None):
  """Text logits (B, T, V) float32 of a GPT or VLM on ``batch`` (with ``return_hidden``:
  (logits, final hidden states)); ``check_batch`` first (against ``model.config`` when the
  model has one). ``image_tokens``: the batch's images already encoded (a VLM's
  ``encode_image``), used instead of encoding ``batch['image']`` again."""
  check_batch(batch, getattr(model, "config", None))
  args, kwargs = model_args(batch)
  if return_hidden:
    kwargs["return_hidden"] = True
  if image_tokens is not None:
    kwargs.pop("image", None)
    kwargs["image_tokens"] = image_tokens
  return model(*args, **kwargs)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(B, T) cross-entropies, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_sums(model, batch: Mapping[str, Any], *, image_tokens: Optional[jax.Array] = None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies, number of masked tokens) on ``batch``."""
  mask = batch["loss_mask"].astype(jnp.float32)
  logits = forward(model, batch, image_tokens=image_tokens)
  return jnp.sum(token_losses(logits, batch["targets"]) * mask), jnp.sum(mask)


def caption_positives(caption_ids: jax.Array, caption_len: jax.Array) -> jax.Array:
  """(B, B) bool: rows i, j have the same caption (same length, same ids up to it) — the
  positives of the contrastive loss, so identical captions of different images are never
  pushed apart as negatives."""
  real = jnp.arange(caption_ids.shape[1])[None, :] < caption_len[:, None]
  ids = jnp.where(real, caption_ids, -1)  # padding never decides equality
  same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
  return same & (caption_len[:, None] == caption_len[None, :])


def contrastive_loss(model, batch: Mapping[str, Any], *,
                     image_tokens: Optional[jax.Array] = None) -> jax.Array:
  """The SigLIP loss of a VLM's contrastive head on ``batch`` (its images against its rows'
  captions; rows with ``caption_len`` 0 take no part); ``image_tokens`` as in ``forward``."""
  if batch.get("caption_ids") is None or batch.get("image") is None:
    raise ValueError(f"batch has keys {sorted(batch)}: the contrastive loss needs 'image', "
                     "'caption_ids' and 'caption_len' (the pipeline emits the captions when "
                     "train.contrastive_weight > 0)")
  ids, lens = batch["caption_ids"], batch["caption_len"].astype(jnp.int32)
  x = (model.image_embedding(image_to_float(batch["image"])) if image_tokens is None
       else model.image_embedding(image_tokens=image_tokens))
  y = model.text_embedding(ids, lens)
  return model.contrastive.loss(x, y, caption_positives(ids, lens), valid=lens > 0)


def joint_loss_sums(model, batch: Mapping[str, Any], contrastive_weight: float
                    ) -> tuple[jax.Array, jax.Array, dict]:
  """LM + ``contrastive_weight`` x contrastive loss, in the (sum, count) form of
  ``loss_sums``: the contrastive term enters the sum scaled by the token count, so
  sum / count = mean LM loss + w * contrastive loss. The third element holds the two parts
  in the same (sum) form, for the step to report as ``lm_loss`` / ``contrastive_loss``."""
  # One image encoding for both losses (their gradients meet in the vision tower).
  check_batch(batch, getattr(model, "config", None))
  tokens = model.encode_image(image_to_float(batch["image"])) if "image" in batch else None
  lm_sum, count = loss_sums(model, batch, image_tokens=tokens)
  closs = contrastive_loss(model, batch, image_tokens=tokens)
  extra = {"lm_loss": lm_sum, "contrastive_loss": closs * count}
  return lm_sum + contrastive_weight * closs * count, count, extra


def batch_shardings(mesh) -> dict:
  """Every batch key, rows split over the mesh's batch axes."""
  s = shd.batch_sharding(mesh)
  return {k: s for k in BATCH_KEYS}


def global_batch(local: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict:
  """Per-process numpy batch -> global ``jax.Array``s laid out by ``shardings`` (per key);
  keys without a sharding are dropped."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items() if k in shardings}
