"""Sizes and compact checkpoints of (quantized) models: bytes in memory and on disk, int4
packed two per byte, and orbax save / load of a quantized model's parameters.

orbax (tensorstore zarr, dtype "int4") stores int4 unpacked, one byte per element (an
uncompressed tensorstore write of 1M int4 takes 1,048,738 bytes); orbax's default zstd then
happens to squeeze the empty nibble out, but that depends on the compressor. We pack two
int4 per uint8 so the stored array really is 0.5 byte per weight.

Needs no qwix: a quantized model's state is plain arrays (int8 / int4 ``qvalue`` s, float
``scale`` s).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gptjax.tree import is_variable

INT4_DTYPES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def is_int4(x) -> bool:
  return jnp.dtype(x.dtype) in INT4_DTYPES


def pure_tree(tree) -> dict:
  """An ``nnx.State`` or a pytree with ``nnx.Variable`` leaves as plain arrays."""
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree,
                      is_leaf=is_variable)


def _nbytes(x) -> float:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x).nbytes
  return x.size * (0.5 if is_int4(x) else jnp.dtype(x.dtype).itemsize)


def state_bytes(model_or_tree) -> float:
  """Sum of array sizes (a model: its whole state), int4 counted as 0.5 byte per element."""
  tree = nnx.state(model_or_tree) if isinstance(model_or_tree, nnx.Module) else model_or_tree
  return sum(_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def bytes_on_disk(path) -> int:
  """Total size of the files under ``path`` (or of the file ``path``)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def pack_int4(x: jax.Array) -> jax.Array:
  """int4 array -> flat uint8 array of ceil(size / 2): element 2i in the low nibble."""
  v = jnp.ravel(x).astype(jnp.int8).astype(jnp.uint8) & 0xF
  if v.size % 2:
    v = jnp.concatenate([v, jnp.zeros((1,), jnp.uint8)])
  return (v[0::2] | (v[1::2] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, shape, dtype=jnp.int4) -> jax.Array:
  """Inverse of ``pack_int4``: the ``shape`` array of int4 (or uint4) ``dtype``."""
  packed = jnp.asarray(packed, jnp.uint8)
  v = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:math.prod(shape)]
  signed = v.astype(jnp.int8)
  if jnp.dtype(dtype) == jnp.dtype(jnp.int4):
    signed = jnp.where(signed >= 8, signed - 16, signed)
  return signed.astype(dtype).reshape(shape)


def _to_storage(tree):
  return jax.tree.map(lambda x: pack_int4(x) if is_int4(x) else x, tree)


def _host_if_addressable(tree):
  """Fully addressable arrays -> NumPy. Why: orbax then writes no per-array sharding files
  (``_sharding``, ``array_metadatas``: ~45 % of a 100k-parameter artifact), and a deployment
  artifact is re-sharded on load anyway (``load_quantized`` restores with the target's
  shardings). Arrays spread over several hosts are saved as they are."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.tree.map(np.asarray, tree)
  return tree


def save_pytree(tree, directory) -> int:
  """Save a pytree of arrays with orbax's StandardCheckpointer (int4 leaves packed two per
  byte); returns the bytes written, measured on disk. ``directory`` must not exist."""
  directory = os.path.abspath(os.fspath(directory))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(directory, _host_if_addressable(_to_storage(pure_tree(tree))))
  ckpt.wait_until_finished()
  ckpt.close()
  return bytes_on_disk(directory)


def save_quantized(model: nnx.Module, directory) -> int:
  """Write the parameters of a (quantized) model -- int8/int4 ``qvalue`` s, float
  ``scale`` s (weights and static activations), float biases/norms/embeddings -- and return
  the real size on disk in bytes. RNG streams (dropout) are not saved."""
  return save_pytree(nnx.state(model, nnx.Param), directory)


def load_quantized(directory, target: nnx.Module) -> nnx.Module:
  """Restore ``save_quantized`` output into a copy of ``target``: a quantized model of the
  same architecture made the same way (e.g. ``int4_weight_only(GPT(cfg, rngs=...))``; its
  values are ignored). Returns the restored model."""
  model = nnx.clone(target)
  params = nnx.state(model, nnx.Param)
  tree = nnx.to_pure_dict(params)

  def abstract(x):
    if is_int4(x):
      return jax.ShapeDtypeStruct(((x.size + 1) // 2,), jnp.uint8, sharding=None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  ckpt = ocp.StandardCheckpointer()
  restored = ckpt.restore(os.path.abspath(os.fspath(directory)), jax.tree.map(abstract, tree))
  ckpt.close()

  def unpack(t, r):
    if not is_int4(t):
      return r
    x = unpack_int4(r, t.shape, t.dtype)
    sharding = getattr(t, "sharding", None)
    return x if sharding is None else jax.device_put(x, sharding)

  restored = jax.tree.map(unpack, tree, restored)
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return model
