"""Shared pieces of tests/test_train.py and tests/test_train_cli.py: tiny configs, the
prepared ``shapes`` data, a persistent XLA compilation cache, and small comparisons.

Compiling is most of the cost of these tests on CPU (initialising the tiny VLM compiles for
~10 s, its train step for ~8 s, and ``run()`` recompiles both on every call), so runs of
the same program share an on-disk compilation cache. The cache only changes how fast an
executable is obtained, never what it computes.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The built-in shapes data, small: 64/32/32 records, 16x16 images (4 tasks per record).
SHAPES_KW = dict(image_size=16, train_size=64, validation_size=32, test_size=32, seed=0)
# A VLM small enough to compile and run quickly: 16 image tokens (16 px, two 2x2 pools).
VISION_KW = dict(kind="cnn", image_size=16, cnn_channels=(8, 8), width=16)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
  """A data_dir with the small shapes splits prepared once per test session (worker)."""
  from gptjax.data.datasets import load_source
  d = tmp_path_factory.mktemp("shapes_data")
  for split in ("train", "validation", "test"):
    load_source("shapes", split, data_dir=str(d), **SHAPES_KW)
  return str(d)


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory) -> str:
  """One on-disk XLA compilation cache per test session (per xdist worker: no two processes
  write the same cache file at once), or the one ``JAX_COMPILATION_CACHE_DIR`` names."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
      tmp_path_factory.mktemp("jax_compile_cache"))


@contextlib.contextmanager
def persistent_compile_cache(path: str):
  """Use ``path`` as jax's persistent compilation cache inside the block, then restore the
  previous setting (the cache is process-global; other test modules see no change)."""
  import jax
  try:
    from jax._src import compilation_cache as cc
  except ImportError:  # pragma: no cover - private module moved: run uncached (slower)
    yield
    return
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", path)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old)
    cc.reset_cache()


def tiny_vlm_config(data_dir: str, **model_overrides):
  """The training config of these tests: a tiny VLM on the small shapes data, batch 8,
  6 steps, no eval during training, no progress bar / TensorBoard / plot.

  Its dims divide by 8 (8 heads, mlp 64, vocab 264 >= the tokenizer's 260, conv channels 8)
  so FSDP and tensor-parallel meshes really shard it. AdamW runs at a constant lr 3e-3
  without weight decay: it overfits one batch quickly, and the jitted step on the default
  (8, 1, 1) mesh is the same program whatever ``train.steps`` a step test uses, so it is
  compiled once for the step tests and ``run()``. ``eps=1e-5``: Adam divides by
  sqrt(v) + eps, and a parameter whose true gradient is 0 (the attention key bias: softmax
  is shift-invariant) would otherwise turn float noise (~1e-10) into updates of ~lr/100 that
  differ between device layouts.
  """
  from gptjax.runs import base_config
  from gptjax.train.config import model_section, shapes_kwargs, vision_section
  c = base_config()
  model = dict(max_seq_len=112, num_heads=8, num_kv_heads=None, mlp_dim=64, vocab_size=264,
               vision=vision_section(**VISION_KW))
  model.update(model_overrides)
  c.model = model_section("tiny", **model)
  c.data.name = "shapes"
  c.data.task = "vqa"
  c.data.data_dir = data_dir
  c.data.builder_kwargs = shapes_kwargs(**SHAPES_KW)
  c.data.prompt_len, c.data.target_len = 40, 60  # 99 text tokens <= 112 (+ 16 image: 128 positions)
  c.optim.lr, c.optim.warmup_steps, c.optim.end_lr_ratio = 3e-3, 0, 1.0
  c.optim.weight_decay, c.optim.eps = 0.0, 1e-5
  c.train.steps = 6
  c.train.batch_size = 8
  c.train.log_every = 1
  c.checkpoint.every = 100
  c.checkpoint.keep = 5
  c.eval.every = 0
  c.eval.batch_size = 8
  c.eval.max_batches = 1
  c.eval.decode_examples = 0
  c.logging.progress = False
  c.logging.tensorboard = False
  c.logging.plot = False
  return c


# The same config as a file for train.py (configs/*.py style). Overrides come from the CLI.
CONFIG_FILE_TEMPLATE = '''\
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from _train_helpers import tiny_vlm_config


def get_config():
  c = tiny_vlm_config({data_dir!r})
  {extra}
  return c
'''


def write_config_file(path, data_dir: str, extra: str = "pass") -> str:
  path = os.fspath(path)
  with open(path, "w") as f:
    f.write(CONFIG_FILE_TEMPLATE.format(
        repo=REPO_ROOT, tests=os.path.join(REPO_ROOT, "tests"), data_dir=data_dir,
        extra=textwrap.indent(extra, "  ").strip()))
  return path


def read_metrics(workdir) -> list[dict]:
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):  # a line being written has no newline yet
        rows.append(json.loads(line))
  return rows


def train_rows(workdir) -> list[dict]:
  return [r for r in read_metrics(workdir) if r["split"] == "train"]


def to_numpy(tree):
  """Every array leaf as a host NumPy array (gathered from all devices)."""
  import jax
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_close(a, b, *, atol: float, rtol: float = 0.0, what: str = "tree"):
  import jax
  la, ta = jax.tree_util.tree_flatten_with_path(to_numpy(a))
  lb, tb = jax.tree_util.tree_flatten_with_path(to_numpy(b))
  assert ta == tb, f"{what}: tree structures differ"
  assert len(la) > 0
  for (path, x), (_, y) in zip(la, lb):
    name = jax.tree_util.keystr(path)
    assert x.shape == y.shape and x.dtype == y.dtype, (what, name, x.shape, y.shape)
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=f"{what}{name}")


def python_env(**extra) -> dict:
  """Environment for a subprocess: CPU only, this repo importable, no progress bars."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
      MPLBACKEND="Agg", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


PYTHON = sys.executable
