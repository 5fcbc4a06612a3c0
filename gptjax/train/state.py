"""The training state pytree and its (sharded) creation."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import sharding as shd
from gptjax.config import ModelConfig
from gptjax.model import GPT, VLM


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, as one pytree (checkpointed whole).

  ``rng`` is raw uint32 key data (not a typed key) so Orbax stores it like any array.
  """
  step: jax.Array  # int32 scalar
  params: nnx.State  # nnx.Param variables, with logical-axis metadata
  opt_state: Any  # optax state mirroring params
  rng: jax.Array  # uint32[2]


def make_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  return (VLM if cfg.vision is not None else GPT)(cfg, rngs=rngs)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int):
  """Initialise directly into the target shardings (no full copy on one device).

  Returns (graphdef, rest, state, state_shardings); ``rest`` is the non-parameter model
  state (dropout RNG streams, reseeded every step, so never checkpointed).
  """

  def init():
    model = make_model(cfg, seed)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed))), rest

  abstract_model = nnx.eval_shape(lambda: make_model(cfg, seed))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  abstract_state, _ = jax.eval_shape(init)
  shardings = shd.state_shardings(abstract_state, mesh)
  with jax.set_mesh(mesh):
    state, rest = jax.jit(init, out_shardings=(shardings, shd.replicated(mesh)))()
  return graphdef, rest, state, shardings


def abstract_train_state(state: TrainState, shardings) -> Any:
  """ShapeDtypeStructs with target shardings: what a checkpoint restore needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
