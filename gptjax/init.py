"""Random initialisation of a module as one compiled program, not op by op.

Built eagerly, every initializer call of every new parameter shape is its own XLA
compilation (~0.05-0.9 s each on CPU: the normal / truncated-normal samplers are the slow
ones), so a tiny VLM took 8.8 s to construct on a 2-core CPU. Traced once and compiled
without LLVM's optimisations (the program runs once) it takes 2.0 s, values equal to
float32 rounding. Flax has no such constructor (``nnx.jit`` of a constructor compiles it
optimised: 8.2 s here), so it is written here.
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable, Optional, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

# Below this many parameters a CPU init compiles unoptimised (see init_compiler_options).
FAST_INIT_COMPILE_MAX_PARAMS = 8_000_000


def init_compiler_options(params, platform: str) -> dict:
  """XLA options for a one-off initialisation program on ``platform``. On CPU, LLVM's
  optimisation of the random-number code dominates a small model's init compile, and the
  program runs once. Measured on a 2-core CPU: ``mini`` preset compile 4.5 s -> 1.4 s
  unoptimised, run 0.01 s -> 0.07 s; a tiny VLM on 8 devices 78 s -> 9.5 s (a loaded
  machine); GPT-2 small compile 12.8 s -> 5.2 s but run 4.2 s -> 19.6 s. So unoptimised
  below ``FAST_INIT_COMPILE_MAX_PARAMS`` parameters, on CPU only; other backends as usual."""
  if platform != "cpu":
    return {}
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if n >= FAST_INIT_COMPILE_MAX_PARAMS:
    return {}
  return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _tracing() -> bool:
  """Inside a jit / eval_shape trace (e.g. a sharded init that builds the model): the
  constructor must then run in that trace, not as a program of its own."""
  try:
    from jax._src import core
    return not core.trace_state_clean()
  except (ImportError, AttributeError):  # pragma: no cover - private API moved: be safe
    return True


# Compiled init programs by the caller's key (e.g. (class, config)): a model built again
# (another seed, another test, a notebook cell run twice) runs its program, not a compile.
_PROGRAMS: "collections.OrderedDict[Hashable, tuple]" = collections.OrderedDict()
_MAX_PROGRAMS = 32


def compiled_init(make: Callable[..., M], *args, key: Optional[Hashable] = None) -> M:
  """``make(*args)`` (a module constructor with its ``nnx.Rngs``; ``args`` e.g. the seed,
  traced: every value shares the program), run as one compiled program on the default
  device when that is a CPU and the module is small (see ``init_compiler_options``);
  otherwise, or inside a trace, simply ``make(*args)``. The parameters are the same random
  draws either way (equal up to float32 rounding). ``key``: a hashable name of the module's
  structure (what ``make`` builds apart from ``args``); programs are kept by it, so building
  the same structure again does not compile again."""
  if _tracing() or jax.default_backend() != "cpu":  # no abstract trace to find that out
    return make(*args)
  args = tuple(jnp.asarray(a) for a in args)
  if key is not None and key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    graphdef, program = _PROGRAMS[key]
    return nnx.merge(graphdef, program(*args))
  abstract = nnx.eval_shape(make, *args)
  options = init_compiler_options(nnx.state(abstract, nnx.Param), jax.default_backend())
  if not options:
    return make(*args)
  graphdef, _ = nnx.split(abstract)
  program = jax.jit(lambda *a: nnx.split(make(*a))[1]).lower(*args).compile(
      compiler_options=options)
  if key is not None:
    _PROGRAMS[key] = graphdef, program
    while len(_PROGRAMS) > _MAX_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  return nnx.merge(graphdef, program(*args))
