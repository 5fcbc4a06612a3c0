"""gptjax.init.compiled_init: the one-program construction draws the same random parameters
as building the module eagerly (second code path: the plain constructor), and inside a
trace it is the plain constructor."""
import jax
import numpy as np
from flax import nnx

import gptjax
from gptjax.init import compiled_init, init_compiler_options
from gptjax.model import VLM, from_config

# One block, a one-layer CNN: every kind of initializer the models use (normal tables,
# truncated-normal kernels, convolutions, zeros, ones), few shapes to compile eagerly.
CFG = gptjax.preset("tiny", depth=1, width=32, num_heads=2, max_seq_len=32,
                    vision=gptjax.VisionConfig(kind="cnn", image_size=8, cnn_channels=(4,),
                                               width=8))


def test_compiled_init_equals_eager_construction():
  make = lambda: VLM(CFG, rngs=nnx.Rngs(params=3, dropout=4))  # noqa: E731
  eager, compiled = make(), compiled_init(make)
  assert type(compiled) is VLM and compiled.config == CFG
  e, c = nnx.state(eager), nnx.state(compiled)
  assert jax.tree.structure(e) == jax.tree.structure(c)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(e), jax.tree.leaves(c)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # the dropout stream's key
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.shape == b.shape and a.dtype == b.dtype, path
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # from_config is that construction (seed -> params=seed, dropout=seed + 1)
  f = nnx.state(from_config(CFG, 3), nnx.Param)
  for a, b in zip(jax.tree.leaves(nnx.state(eager, nnx.Param)), jax.tree.leaves(f)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_inside_a_trace_it_is_the_plain_constructor():
  abstract = nnx.eval_shape(lambda: from_config(CFG, 0))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  # Inside jit: built in the trace, not as a nested compiled program.
  kernel = jax.jit(lambda: from_config(CFG, 0).decoder.embed.embedding[...])()
  assert kernel.shape == (CFG.vocab_size, CFG.width) and np.isfinite(np.asarray(kernel)).all()


def test_compiler_options_only_for_small_models_on_cpu():
  small = [jax.ShapeDtypeStruct((10, 10), np.float32)]
  big = [jax.ShapeDtypeStruct((4000, 2000), np.float32)]
  assert init_compiler_options(small, "cpu")["xla_backend_optimization_level"] == 0
  assert init_compiler_options(big, "cpu") == {}
  assert init_compiler_options(small, "gpu") == {} and init_compiler_options(small, "tpu") == {}


def test_from_config_keeps_one_program_for_every_seed():
  from gptjax import init
  a = nnx.state(from_config(CFG, 5), nnx.Param)
  program = init._PROGRAMS[(VLM, CFG)]
  b = nnx.state(from_config(CFG, 6), nnx.Param)
  assert init._PROGRAMS[(VLM, CFG)] is program  # not compiled again for another seed
  ka, kb = a["decoder"]["embed"]["embedding"][...], b["decoder"]["embed"]["embedding"][...]
  assert not np.allclose(np.asarray(ka), np.asarray(kb))  # ... and the seed is honoured
  eager = VLM(CFG, rngs=nnx.Rngs(params=6, dropout=7))
  np.testing.assert_allclose(np.asarray(kb), np.asarray(eager.decoder.embed.embedding[...]),
                             rtol=1e-5, atol=1e-6)
