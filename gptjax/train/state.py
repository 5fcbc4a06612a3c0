"""The training state pytree and its (sharded) creation."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import sharding as shd
from gptjax.config import ModelConfig
from gptjax.init import init_compiler_options
from gptjax.layout import flip_layout, has_decoder, to_layout
from gptjax.model import from_config
from gptjax.train.checkpoint import CheckpointMismatchError

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, as one pytree (checkpointed whole).

  ``rng`` is raw uint32 key data (not a typed key) so Orbax stores it like any array.
  """
  step: jax.Array  # int32 scalar
  params: nnx.State  # nnx.Param variables, with logical-axis metadata
  opt_state: Any  # optax state mirroring params
  rng: jax.Array  # uint32[2]


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int, *,
                       model_fn: Optional[Callable[[ModelConfig, int], nnx.Module]] = None,
                       init_params: Optional[nnx.State] = None, abstract: bool = False):
  """Initialise directly into the target shardings (no full copy on one device).

  ``model_fn(cfg, seed)`` builds the module (default: GPT or VLM by ``cfg.vision``);
  ``init_params`` (an ``nnx.Param`` state of the module, or of part of it, e.g.
  ``State({'model': ...})`` inside a wrapper) replaces the random initialisation there, e.g.
  to fine-tune a distilled or pruned model.
  Returns (graphdef, rest, state, state_shardings); ``rest`` is the non-parameter model
  state (dropout RNG streams, reseeded every step, so never checkpointed).

  ``abstract=True``, for a state about to be restored from a checkpoint: ``state`` is
  ``jax.ShapeDtypeStruct`` leaves carrying the target shardings (what a restore needs) and
  the initialisation is never compiled or run (it is the largest one-off compile of a small
  run: measured 1-10 s on CPU, more on an 8-device mesh).
  """
  model_fn = model_fn or from_config

  def init(start_params):
    model = model_fn(cfg, seed)
    if start_params is not None:
      nnx.update(model, start_params)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed))), rest

  abstract_model = nnx.eval_shape(lambda: model_fn(cfg, seed))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  if abstract:
    abstract_state, _ = jax.eval_shape(init, None)
    shardings = shd.state_shardings(abstract_state, mesh)
    with jax.set_mesh(mesh):  # only the RNG streams: XLA drops the unused parameter init
      rest = jax.jit(lambda: init(None)[1], out_shardings=shd.replicated(mesh))()
    return graphdef, rest, abstract_train_state(abstract_state, shardings), shardings
  if init_params is not None:  # onto this mesh (it may come from another device set)
    init_params = to_layout(init_params, cfg.scan_layers)  # e.g. GPT-2 weights into a scan
    init_params = jax.device_put(init_params, shd.state_shardings(init_params, mesh))
  abstract_state, _ = jax.eval_shape(init, init_params)
  shardings = shd.state_shardings(abstract_state, mesh)
  with jax.set_mesh(mesh):
    init_fn = jax.jit(init, out_shardings=(shardings, shd.replicated(mesh)))
    compiled = init_fn.lower(init_params).compile(
        compiler_options=init_compiler_options(abstract_state.params,
                                               mesh.devices.flat[0].platform))
    state, rest = compiled(init_params)
  return graphdef, rest, state, shardings


def abstract_train_state(state: TrainState, shardings) -> Any:
  """ShapeDtypeStructs with target shardings: what a checkpoint restore needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def restore_train_state(ckpt, abstract, data_iterator=None, *, step: Optional[int] = None):
  """``ckpt.restore(abstract, data_iterator, step=step)``, also from a checkpoint saved in
  the other decoder layout (``ModelConfig.scan_layers`` flipped since it was written): read
  in the layout it was saved in, then converted (parameters and optimizer moments alike)
  into the target's layout and shardings. A checkpoint that matches neither raises the
  target's own mismatch error."""
  try:
    return ckpt.restore(abstract, data_iterator, step=step)
  except CheckpointMismatchError as mismatch:
    if not has_decoder(abstract):
      raise
    try:  # the tree check runs before any array (or the data iterator) is read
      saved = ckpt.restore(flip_layout(abstract), data_iterator, step=step)
    except CheckpointMismatchError:
      raise mismatch from None
  log.info("checkpoint in the other layer layout (ModelConfig.scan_layers changed): "
           "converted on restore")
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  return jax.jit(flip_layout, out_shardings=shardings)(saved)
