"""What a user of the base install (no extras) gets: a default training run works without
matplotlib / tensorboardX and says once which extra adds the plots and TensorBoard logs;
a config that needs qwix fails at validation, before any training, naming the extra; and
the console script works from any directory with a shipped config's name.

"Not installed" is simulated in a subprocess by a ``sitecustomize`` module that puts an
import-blocking finder first on ``sys.meta_path``, so the venv itself stays complete.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from _train_helpers import (PYTHON, REPO_ROOT, compile_cache_dir, python_env,  # noqa: F401
                            train_rows)

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
EXTRAS = ("matplotlib", "tensorboardX", "qwix")
# The demo config, small: 3 steps of a one-layer decoder on a few records (the size does
# not change what these tests check: compiling the demo's 4 layers cost ~10 s per run); the
# rest (TensorBoard, plots, the final eval with decoded samples) as a default run has it.
SMALL = ["--config.model.depth=1", "--config.model.num_unique_layers=1",
         "--config.model.vision.cnn_channels=(8,16)",
         "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.data.builder_kwargs.train_size=32",
         "--config.data.builder_kwargs.validation_size=8",
         "--config.data.builder_kwargs.test_size=8", "--config.eval.batch_size=8",
         "--config.eval.max_batches=1", "--config.eval.decode_examples=8",
         "--config.optim.warmup_steps=1"]

SITECUSTOMIZE = '''\
import os, sys

_BLOCKED = tuple(m for m in os.environ.get("GPTJAX_TEST_BLOCK", "").split(",") if m)


class _BlockOptionalExtras:
  """Makes the listed top-level modules look not installed."""

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in _BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None


sys.meta_path.insert(0, _BlockOptionalExtras())
'''


@pytest.fixture
def no_extras_env(tmp_path, compile_cache_dir):  # noqa: F811
  """Subprocess environment in which matplotlib, tensorboardX and qwix cannot be imported
  (the demo runs below share one compilation cache: the same programs compile once; the
  drawn images go under tmp_path, not ~/tensorflow_datasets)."""
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
  return python_env(PYTHONPATH=os.pathsep.join([str(shim), REPO_ROOT]),
                    GPTJAX_TEST_BLOCK=",".join(EXTRAS), MPLCONFIGDIR=str(tmp_path / "mpl"),
                    JAX_COMPILATION_CACHE_DIR=compile_cache_dir, TFDS_DATA_DIR=tmp_path / "data")


def _run(cmd, env, cwd, timeout=240) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{cmd} did not finish in {timeout} s; output:\n{e.output}\n{e.stderr}")


def test_the_shim_blocks_the_extras(no_extras_env, tmp_path):
  """The simulation itself: without this the tests below could pass vacuously."""
  code = textwrap.dedent("""
      import importlib
      for m in ("matplotlib", "tensorboardX", "qwix", "matplotlib.figure"):
        try:
          importlib.import_module(m)
        except ImportError:
          continue
        raise SystemExit(f"{m} imported")
      import jax, flax, optax, grain, orbax.checkpoint  # the core still imports
      print("blocked")
  """)
  r = _run([PYTHON, "-c", code], no_extras_env, tmp_path)
  assert r.returncode == 0 and "blocked" in r.stdout, r.stdout + r.stderr


def test_default_train_run_without_extras(no_extras_env, tmp_path):
  w = tmp_path / "w"
  r = _run([PYTHON, TRAIN_PY, "--config", "configs/demo.py", f"--workdir={w}",
            *SMALL],
           no_extras_env, REPO_ROOT)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out
  assert len(train_rows(w)) == 3, out
  # It trained to the end (final test metrics) and skipped only what the extra adds.
  summary = [json.loads(line) for line in open(w / "metrics.jsonl")]
  assert any(row["split"] == "test" and row.get("tokens", 0) > 0 for row in summary), out
  assert not (w / "loss_curves.png").exists() and not (w / "samples.png").exists()
  assert not (w / "tb").exists() or not os.listdir(w / "tb")
  warnings = [line for line in out.splitlines() if "gptjax[train]" in line]
  assert len(warnings) == 1, out
  assert "matplotlib" in warnings[0] and "tensorboardX" in warnings[0], warnings


def test_qat_without_qwix_fails_before_training(no_extras_env, tmp_path):
  w = tmp_path / "w"
  r = _run([PYTHON, TRAIN_PY, "--config=demo", f"--workdir={w}", "--config.qat.enabled=True",
            *SMALL], no_extras_env, REPO_ROOT, timeout=120)
  out = r.stdout + r.stderr
  assert r.returncode != 0, out
  assert "pip install 'gptjax[quant]'" in out and "qat" in out, out
  assert not train_rows(w) and not (w / "checkpoints").exists(), "it trained before failing"


def test_validation_names_the_quant_extra(monkeypatch):
  """In-process: ``hooks.validate`` (QAT) and the recipe's ``validate`` without qwix."""
  from gptjax.compress import hooks, recipe
  from gptjax.configs import mini_recipe
  from gptjax.runs import base_config
  c = base_config()
  c.qat.enabled = True
  hooks.validate(c)  # qwix is installed here: no error
  r = mini_recipe.get_config()
  recipe.validate(r)
  monkeypatch.setitem(sys.modules, "qwix", None)  # `import qwix` now raises ImportError
  with pytest.raises(ValueError, match=r"pip install 'gptjax\[quant\]'"):
    hooks.validate(c)
  with pytest.raises(ValueError, match=r"recipe.*pip install 'gptjax\[quant\]'"):
    recipe.validate(r)
  c.qat.enabled = False
  hooks.validate(c)  # a config that does not quantize does not need qwix


def test_console_script_outside_the_repository(tmp_path, compile_cache_dir):  # noqa: F811
  script = os.path.join(os.path.dirname(PYTHON), "gptjax-train")
  assert os.path.exists(script), (
      f"{script} missing: reinstall gptjax so its console scripts are created "
      f"({PYTHON} -m pip install -e . --no-deps)")
  env = python_env(JAX_COMPILATION_CACHE_DIR=compile_cache_dir, MPLCONFIGDIR=tmp_path / "mpl",
                   TFDS_DATA_DIR=tmp_path / "data")
  env["PYTHONPATH"] = ""  # the installed package, not the checkout on the path
  w = tmp_path / "w"
  r = _run([script, "--config", "demo", f"--workdir={w}", "--config.logging.plot=False",
            *SMALL], env, tmp_path)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out
  assert len(train_rows(w)) == 3, out
  assert "final test" in out, out


def test_config_names_resolve_to_shipped_files():
  from gptjax import configs as shipped
  from gptjax.cli.configs import resolve_config_arg
  demo = shipped.path("demo")
  assert os.path.isfile(demo)
  argv = ["gptjax-train", "--config", "demo", "--config.train.steps=3", "--workdir=w"]
  assert resolve_config_arg(argv, shipped.TRAIN) == [
      "gptjax-train", f"--config={demo}", "--config.train.steps=3", "--workdir=w"]
  assert resolve_config_arg(["x", "--config=demo"], shipped.TRAIN) == ["x", f"--config={demo}"]
  path = os.path.join(REPO_ROOT, "configs", "demo.py")  # a path stays a path
  assert resolve_config_arg(["x", f"--config={path}"], shipped.TRAIN) == ["x", f"--config={path}"]
  with pytest.raises(SystemExit, match="mini_recipe"):  # a recipe is not a training config
    resolve_config_arg(["x", "--config", "mini_recipe"], shipped.TRAIN)
  with pytest.raises(SystemExit, match="shipped: demo"):
    resolve_config_arg(["x", "--config=nope"], shipped.TRAIN)


# Validation of these reads files that exist only where they run (gpt2_small_tpu: the
# pre-tokenised corpus and its tokenizer on the TPU VM's disk; finetune_gpt2: GPT-2's files):
# here they only have to load.
NEEDS_LOCAL_FILES = ("gpt2_small_tpu", "finetune_gpt2")


def test_every_shipped_config_validates():
  """Each shipped config, and its top-level configs/ wrapper, gives a config that passes
  validation (a config that only fails after minutes of someone's training is a bug here)."""
  from gptjax import configs as shipped
  from gptjax.compress import recipe
  from gptjax.runs import validate
  from gptjax.train.config import load_config_file
  for name in shipped.names():
    for path in (shipped.path(name), os.path.join(REPO_ROOT, "configs", f"{name}.py")):
      c = load_config_file(path)
      assert c.is_locked, path
      if name not in NEEDS_LOCAL_FILES:
        (recipe.validate if name in shipped.RECIPE else validate)(c)
