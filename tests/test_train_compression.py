"""Compression switched on from the training config (gptjax/compress/training.py): QAT
(``config.qat``) and gradual pruning (``config.prune``) through the real training loop, on
the 8-device test mesh, and reloaded from the workdir as what was trained."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _train_helpers import (assert_trees_close, persistent_compile_cache, compile_cache_dir,  # noqa: F401
                            shapes_data_dir, tiny_vlm_config, train_rows)
from gptjax.runs import load_model, validate
from gptjax.runs import train as run
from gptjax.model import from_config as make_model


def _probe_batch(vocab: int):
  rng = np.random.default_rng(0)
  return dict(inputs=rng.integers(0, vocab, (2, 10)).astype(np.int32),
              image=(rng.random((2, 16, 16, 3))).astype(np.float32))


# Jitted forwards: eagerly, every op of a (QAT / int8) model compiles on its own.
_fwd = nnx.jit(lambda m, tokens, image: m(tokens, image))


def _kernels_and_others(params):
  """(kernel leaves, every other leaf) by name: the prunable ones are exactly the
  ``kernel`` arrays here (embedding / position tables, biases and norms are not)."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
  kernels = [np.asarray(v) for p, v in flat if jax.tree_util.keystr(p).endswith("['kernel']")]
  others = [np.asarray(v) for p, v in flat if not jax.tree_util.keystr(p).endswith("['kernel']")]
  return kernels, others


@pytest.mark.slow
def test_qat_from_config_trains_reloads_and_converts(shapes_data_dir, compile_cache_dir,  # noqa: F811
                                                      tmp_path):
  from gptjax.compress import quantize as Q
  c = tiny_vlm_config(shapes_data_dir)
  c.qat.enabled = True
  c.train.steps = 8
  with persistent_compile_cache(compile_cache_dir):
    out = run(c, str(tmp_path / "qat"))
    c_float = tiny_vlm_config(shapes_data_dir)
    c_float.train.steps = 8
    run(c_float, str(tmp_path / "float"))
  rows = train_rows(tmp_path / "qat")
  assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
  assert np.isfinite(out["test"]["loss"])

  model = load_model(str(tmp_path / "qat"))
  float_model = load_model(str(tmp_path / "float"))
  mcfg = validate(c)
  assert type(model) is not type(make_model(mcfg)), "the QAT run must reload as a QAT model"
  # Same data, seed and init: only fake quantization made the two trainings differ.
  qp, fp = nnx.state(model, nnx.Param), nnx.state(float_model, nnx.Param)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(qp),
                                                          jax.tree.leaves(fp)))
  assert diff > 1e-5, diff

  # Second code path: a float model with the reloaded parameters, made QAT by hand.
  by_hand = make_model(mcfg)
  nnx.update(by_hand, qp)
  batch = _probe_batch(mcfg.vocab_size)
  qat_out = _fwd(model, batch["inputs"], batch["image"])
  np.testing.assert_allclose(
      np.asarray(_fwd(Q.qat_model(by_hand), batch["inputs"], batch["image"])),
      np.asarray(qat_out), rtol=1e-5, atol=1e-5)
  float_out = _fwd(by_hand, batch["inputs"], batch["image"])
  rel = float(jnp.linalg.norm(qat_out - float_out) / jnp.linalg.norm(float_out))
  assert 1e-4 < rel < 0.05, rel  # fake quantization is on, and int8-sized
  # ... and it converts to a real int8 model that computes what training saw.
  q8 = Q.convert_qat_to_int8(model)
  leaves = {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(q8)))}
  qvalues = [k for k in leaves if k.endswith("['qvalue']")]
  assert "['decoder']['blocks'][0]['mlp']['up']['kernel']['array']['qvalue']" in qvalues
  assert all(leaves[k].dtype == jnp.int8 for k in qvalues)
  real = _fwd(q8, batch["inputs"], batch["image"])
  assert float(jnp.linalg.norm(real - qat_out) / jnp.linalg.norm(qat_out)) < 1e-2


@pytest.mark.slow
def test_gradual_pruning_from_config_exact_sparsity_and_resume(shapes_data_dir,  # noqa: F811
                                                              compile_cache_dir, tmp_path):
  def config(steps):
    c = tiny_vlm_config(shapes_data_dir)
    c.prune.enabled = True
    c.prune.final_sparsity = 0.6
    c.prune.begin_step, c.prune.end_step, c.prune.frequency = 0, 6, 2
    c.optim.weight_decay = 0.1  # AdamW decay and momentum must not regrow pruned weights
    c.train.steps = steps
    c.checkpoint.every = 4
    return c

  with persistent_compile_cache(compile_cache_dir):
    run(config(10), str(tmp_path / "straight"))
    run(config(4), str(tmp_path / "resumed"))  # stops mid-schedule (sparsity 0 < s < 0.6)
    mid = load_model(str(tmp_path / "resumed"))
    run(config(10), str(tmp_path / "resumed"))  # resumes: masks come back from the checkpoint

  kernels, others = _kernels_and_others(nnx.state(mid, nnx.Param))
  n = sum(k.size for k in kernels)
  mid_zeros = sum(int((k == 0).sum()) for k in kernels)
  assert 0 < mid_zeros < math.floor(0.6 * n)  # the cubic schedule is under way at step 4

  straight = load_model(str(tmp_path / "straight"))
  kernels, others = _kernels_and_others(nnx.state(straight, nnx.Param))
  # Global L1 over all kernels: exactly round(0.6 n) zeros, checked three steps after the
  # last mask update (so momentum and decay had steps to regrow them, and did not).
  # (Was floor(0.6 n): pruning now prunes torch.nn.utils.prune's count, round(amount * n),
  # half to even; 0.6 n is never a tie, so this only moves the expectation when n's
  # fraction part is .6 or .8.)
  assert sum(int((k == 0).sum()) for k in kernels) == round(0.6 * n)
  assert all(int((o == 0).sum()) == 0 for o in others)  # embeddings, norms, biases untouched
  resumed = load_model(str(tmp_path / "resumed"))
  assert_trees_close(nnx.state(resumed, nnx.Param), nnx.state(straight, nnx.Param),
                     atol=1e-6, what="resumed vs straight")


@pytest.mark.parametrize("key,value,shown", [
    ("qat.weight_qtype", "int3", "'int8', 'int4'"),
    ("qat.act_qtype", "fp8", "or None"),
    ("prune.method", "random", "'global', 'layerwise', 'n_m'"),
    ("prune.final_sparsity", 1.0, "[0, 1)"),
    ("prune.end_step", 0, "begin_step=2"),
    ("prune.frequency", 0, "positive integer"),
    ("prune.n", 5, "0 < n <= m (m=4)"),
])
def test_bad_compression_config_names_the_field(shapes_data_dir, key, value, shown):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  section = key.split(".")[0]
  c[section].enabled = True
  c.prune.begin_step = 2
  if key == "prune.n":
    c.prune.method = "n_m"
  validate(c)
  c[section][key.split(".")[1]] = value
  with pytest.raises(ValueError, match=re.escape(f"config.{key}=")) as info:
    validate(c)
  assert shown in str(info.value)
