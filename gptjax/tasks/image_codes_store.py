"""An image tokenizer on disk: ``config.json`` (format tag + ``ImageCodesConfig``) and
``params.safetensors`` (the autoencoder's parameters by tree path), written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.tasks.image_codes import ImageCodes, ImageCodesConfig

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
FORMAT = "gptjax.image_codes/1"


def _flat(pure: dict) -> tuple[list[str], list, object]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  keys = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
  return keys, [v for _, v in leaves], treedef


def save(model: ImageCodes, config: ImageCodesConfig, directory: str) -> str:
  """Write ``config.json`` + ``params.safetensors`` into ``directory`` (replaced whole: the
  files are written to a temporary sibling first and renamed into place, so a crash leaves
  either the old tokenizer or the new one, never a mix)."""
  from safetensors.numpy import save_file

  if config != model.config:
    raise ValueError(f"config {config} does not match the model's {model.config}")
  keys, values, _ = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  directory = os.path.abspath(os.path.expanduser(directory))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({"format": FORMAT, "config": config.to_json()}, f, indent=2)
    save_file({k: np.asarray(v) for k, v in zip(keys, values)}, os.path.join(tmp, PARAMS_FILE))
    old = None
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old-", dir=parent)
      os.rename(directory, os.path.join(old, "x"))
    os.rename(tmp, directory)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def load(directory: str) -> ImageCodes:
  """The tokenizer ``save`` wrote into ``directory``."""
  from safetensors.numpy import load_file

  directory = os.path.expanduser(directory)
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"directory={directory!r} is invalid: no {CONFIG_FILE} (not an image "
                     "codes directory written by gptjax.tasks.image_codes_store.save)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
  config = ImageCodesConfig.from_json(meta["config"])
  # Abstract: every parameter is replaced by the stored one, so none is initialised.
  model = nnx.eval_shape(lambda: ImageCodes(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  keys, values, treedef = _flat(nnx.to_pure_dict(state))
  stored = load_file(os.path.join(directory, PARAMS_FILE))
  if set(stored) != set(keys):
    raise ValueError(f"{directory}: stored parameters {sorted(set(stored) ^ set(keys))} do "
                     "not match the model of its config")
  new = []
  for k, v in zip(keys, values):
    if stored[k].shape != v.shape:
      raise ValueError(f"{directory}: parameter {k} has shape {stored[k].shape}, expected "
                       f"{v.shape}")
    new.append(jnp.asarray(stored[k]))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
  nnx.update(model, state)
  return model
