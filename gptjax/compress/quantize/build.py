"""Making a qwix-quantized model without qwix's eager call.

``qwix.quantize_model(model, provider, *sample_inputs)`` initialises an NNX model by calling
it once, eagerly. Eager JAX compiles every primitive on first use (~10 s for the tiny GPT on
2 CPU cores), so we never run that call for real: ``nnx.eval_shape`` traces it (giving the
quantized *structure*, abstract: ``abstract_quantize``), and the values are filled in by one
jitted ``qwix.quantize_params`` (``materialize``) or copied from the source model.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx, traverse_util

from gptjax import batch as batch_lib
from gptjax.tree import flat_dict


def dummy_batch(model: nnx.Module) -> dict:
  """Shape-only sample input (qwix must call an NNX model once to quantize it): up to 8
  text tokens, and a zero image for a VLM."""
  cfg = model.config
  vision = getattr(cfg, "vision", None)
  batch = {"inputs": jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)}
  if vision is not None and hasattr(model, "vision"):
    batch["image"] = jnp.zeros((1, vision.image_size, vision.image_size, vision.channels),
                               jnp.uint8)
  return batch


def sample_or_dummy(model: nnx.Module, sample_batch: Optional[Mapping[str, Any]]) -> Mapping:
  return sample_batch if sample_batch is not None else dummy_batch(model)


def quantize_model(model: nnx.Module, provider, batch: Optional[Mapping[str, Any]] = None,
                   **extra) -> nnx.Module:
  """``qwix.quantize_model`` called with the model arguments of ``batch`` (none if None)."""
  args, kwargs = batch_lib.model_args(batch) if batch is not None else ((), {})
  return qwix.quantize_model(model, provider, *args, **kwargs, **extra)


def abstract_quantize(model: nnx.Module, provider, batch: Mapping[str, Any]) -> nnx.Module:
  """The quantized model qwix would make, every array abstract (``jax.ShapeDtypeStruct``)."""
  return nnx.eval_shape(lambda m, b: quantize_model(m, provider, b), model, batch)


def check_concrete(model: nnx.Module, what: str) -> nnx.Module:
  """``model``, after checking no array of its state is still abstract."""
  missing = [name for name, x in flat_dict(nnx.state(model)).items()
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise RuntimeError(f"{what}: no value for {missing[:5]} ({len(missing)} leaves)")
  return model


def materialize(abstract_q: nnx.Module, float_state: dict, quant_stats: dict) -> nnx.Module:
  """Fill an abstract PTQ model: ``quantize_params(float_state, abstract_q, quant_stats)``.

  ``float_state``: pure dict of the float model's state (params, and e.g. RNG counts, which
  pass through unchanged). ``quant_stats`` are closed over, not traced: quantize_params
  checks their counts in Python.
  """
  quant_stats = jax.tree.map(np.asarray, quant_stats)  # host values: compared in Python
  # quantize_params makes static activation scales float32 (from the float32 statistics),
  # whereas the PTQ model expects its activations' dtype (bf16 for a bf16 model) and
  # rejects a mismatch at call time: cast to the template's dtypes.
  want = {k: v.dtype for k, v in traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(abstract_q))).items()}

  def fill(p):
    flat = traverse_util.flatten_dict(qwix.quantize_params(p, abstract_q, quant_stats))
    for k, v in flat.items():
      if k in want and want[k] != v.dtype and jnp.issubdtype(v.dtype, jnp.floating):
        flat[k] = v.astype(want[k])
    return traverse_util.unflatten_dict(flat)

  nnx.update(abstract_q, jax.jit(fill)(float_state))
  return check_concrete(abstract_q, "quantize_params")


def zero_stats(model: nnx.Module) -> None:
  """Materialise abstract quant_stats as qwix initialises them: count 0, sums 0."""
  nnx.update(model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 nnx.state(model, qwix.QuantStat)))


def float_state(model: nnx.Module) -> dict:
  """Pure dict of everything but the calibration statistics."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Not(qwix.QuantStat)))


def quant_stats(model: nnx.Module) -> dict:
  """Pure dict of the calibration statistics (``qwix.QuantStat``)."""
  return nnx.to_pure_dict(nnx.state(model, qwix.QuantStat))
