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
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import sharding as shd
from gptjax.layers.attention import PAD_SEGMENT, SHARED_SEGMENT  # noqa: F401  (re-exported)

# What a train / eval step reads (the rest stays on the host).
MODEL_KEYS = ("inputs", "targets", "loss_mask", "image", "segment_ids", "positions")
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


def forward(model, batch: Mapping[str, Any], *, return_hidden: bool = False):
  """Text logits (B, T, V) float32 of a GPT or VLM on ``batch`` (with ``return_hidden``:
  (logits, final hidden states))."""
  args, kwargs = model_args(batch)
  if return_hidden:
    kwargs["return_hidden"] = True
  return model(*args, **kwargs)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(B, T) cross-entropies, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_sums(model, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies, number of masked tokens) on ``batch``."""
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(token_losses(forward(model, batch), batch["targets"]) * mask), jnp.sum(mask)


def batch_shardings(mesh) -> dict:
  """Every batch key, rows split over the mesh's batch axes."""
  s = shd.batch_sharding(mesh)
  return {k: s for k in BATCH_KEYS}


def global_batch(local: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict:
  """Per-process numpy batch -> global ``jax.Array``s laid out by ``shardings`` (per key);
  keys without a sharding are dropped."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items() if k in shardings}
