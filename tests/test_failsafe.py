"""Failures a run survives, or refuses with a message that says what to run: non-finite
losses (stop / skip), an unreadable checkpoint (its hint, pasted into the same command, and
``checkpoint.fallback``), two runs on one workdir, a stale lock of a killed run, an
unwritable workdir and a checkpoint save that fails (disk full).

The faults are injected (a divergent learning rate, NaN images in the batch stream, truncated
checkpoint files, a writer raising ENOSPC); every check reads what the run left on disk.
"""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import grain
import jax
import numpy as np
import pytest

from _train_helpers import (PYTHON, REPO_ROOT, compile_cache_dir,  # noqa: F401
                            persistent_compile_cache, python_env, shapes_data_dir,
                            tiny_vlm_config, to_numpy, train_rows, write_config_file)
from gptjax import sharding as shd
from gptjax.train import lock as lock_lib
from gptjax.train.checkpoint import (CheckpointCorruptError, Checkpointer, CheckpointSaveError,
                                     step_override)
from gptjax.train.config import validate
from gptjax.train.guard import NonFiniteError
from gptjax.train.loop import run
from gptjax.train.optim import make_optimizer
from gptjax.train.state import create_train_state

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(compile_cache_dir):  # noqa: F811
  with persistent_compile_cache(compile_cache_dir):
    yield


def _config(data_dir, **train):
  c = tiny_vlm_config(data_dir)  # 6 steps: the programs of tests/test_train.py
  c.data.eval_split = c.data.test_split = ""
  for k, v in train.items():
    sec, key = k.split("__")
    c[sec][key] = v
  return c


def _abstract(c):
  run_mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  return create_train_state(validate(c), make_optimizer(c), run_mesh, c.seed, abstract=True)[2]


def _steps(w) -> list[int]:
  with Checkpointer(os.path.join(w, "checkpoints"), save_every=1000) as ckpt:
    return ckpt.all_steps()


def _restore_all(w, abstract) -> dict:
  with Checkpointer(os.path.join(w, "checkpoints"), save_every=1000) as ckpt:
    return {s: to_numpy(ckpt.restore(abstract, step=s)) for s in ckpt.all_steps()}


def _all_finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(x.dtype, np.floating))


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cli(config_file, workdir, *overrides):
  return [PYTHON, TRAIN_PY, f"--config={config_file}", f"--workdir={workdir}", *overrides]


def _cli_env(cache_dir):
  return python_env(XLA_FLAGS=EIGHT_DEVICES, JAX_COMPILATION_CACHE_DIR=cache_dir)


def _run_cli(cmd, env, timeout=240) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{cmd} did not finish in {timeout} s:\n{e.stdout}\n{e.stderr}")


@pytest.fixture(scope="module")
def config_file(shapes_data_dir, tmp_path_factory):  # noqa: F811
  path = tmp_path_factory.mktemp("failsafe_config") / "tiny_vlm.py"
  return write_config_file(path, shapes_data_dir,
                           extra='c.data.eval_split = ""\nc.data.test_split = ""')


# ----------------------------------------------------------------------------- non-finite


@pytest.fixture(scope="module")
def diverged(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """A run at lr 1e30 (step 1 blows the params up to ~1e30, step 2's loss is NaN), saving
  every step: -> (config, workdir, error)."""
  c = _config(shapes_data_dir, optim__lr=1e30, checkpoint__every=1)
  w = str(tmp_path_factory.mktemp("diverged"))
  with pytest.raises(NonFiniteError) as info:
    run(c, w)
  return c, w, info.value


def test_divergent_lr_stops_and_keeps_only_good_checkpoints(diverged):
  c, w, err = diverged
  rows = train_rows(w)
  bad = [r["step"] for r in rows if r["nonfinite"]]
  assert bad and bad[0] == err.step, (rows, err.step)
  assert not np.isfinite(rows[-1]["loss"])
  msg = str(err)
  assert f"step {err.step}" in msg and "--config.optim.lr=1e+29" in msg, msg
  assert "--config.optim.clip_norm=" in msg and f"{err.last_finite_loss:.4g}" in msg, msg
  # Every checkpoint on disk restores, is finite and is from before the divergence.
  saved = _restore_all(w, _abstract(c))
  assert saved and max(saved) < err.step, (sorted(saved), err.step)
  for step, state in saved.items():
    assert int(state.step) == step and _all_finite(state), step
  assert not os.path.exists(os.path.join(w, lock_lib.LOCK_FILE))  # released on the error


def test_nonfinite_stop_exits_1_with_the_message(diverged, config_file, tmp_path,
                                                 compile_cache_dir):  # noqa: F811
  r = _run_cli(_cli(config_file, tmp_path / "w", "--config.optim.lr=1e30"),
               _cli_env(compile_cache_dir))
  assert r.returncode == 1, r.stderr[-3000:]
  assert "NonFiniteError" in r.stderr and "--config.optim.lr=1e+29" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr, r.stderr[-3000:]


class _NaNImages:
  """The run's batch stream with float images (so NaN can be in them), NaN in the batches
  of ``bad_steps`` (1-based: batch i feeds step i of a fresh run)."""

  def __init__(self, pipe, bad_steps):
    self.pipe, self.bad, self.n = pipe, set(bad_steps), 0

  @property
  def iterator(self):
    return self.pipe.iterator

  @property
  def num_examples(self):
    return self.pipe.num_examples

  def __iter__(self):
    return self

  def __next__(self):
    b = dict(next(self.pipe))
    self.n += 1
    image = b["image"].astype(np.float32) / 255.0
    if self.n in self.bad:
      image[1, 3, 5, 0] = np.nan  # one pixel of one row poisons the whole batch's loss
    b["image"] = image
    return b


def _poison(monkeypatch, bad_steps):
  import gptjax.train.loop as loop
  original = loop.pipeline_for

  def pipeline_for(c, source, *, train, batch_size, **kw):
    pipe = original(c, source, train=train, batch_size=batch_size, **kw)
    return _NaNImages(pipe, bad_steps) if train else pipe

  monkeypatch.setattr(loop, "pipeline_for", pipeline_for)


def test_skip_mode_skips_exactly_the_poisoned_steps(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  c = _config(shapes_data_dir, train__nonfinite="skip", train__max_skipped=2,
              checkpoint__every=1, checkpoint__keep=10)
  _poison(monkeypatch, {3, 4})
  w = str(tmp_path / "w")
  summary = run(c, w)
  assert summary["step"] == 6 and summary["skipped_steps"] == 2
  rows = train_rows(w)
  assert [r["nonfinite"] for r in rows] == [0, 0, 1, 1, 0, 0], rows
  assert np.isfinite([rows[i]["loss"] for i in (0, 1, 4, 5)]).all()
  saved = _restore_all(w, _abstract(c))
  assert sorted(saved) == [1, 2, 3, 4, 5, 6]
  assert all(_all_finite(s) for s in saved.values())
  for s in (3, 4):  # the poisoned steps changed nothing but the step counter ...
    assert int(saved[s].step) == s
    assert _same(saved[s].params, saved[2].params) and _same(saved[s].opt_state,
                                                              saved[2].opt_state)
  for s in (2, 5, 6):  # ... the others trained on
    assert not _same(saved[s].params, saved[s - 1].params), s


def test_skip_mode_stops_after_max_skipped_in_a_row(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  c = _config(shapes_data_dir, train__nonfinite="skip", train__max_skipped=1,
              checkpoint__every=2, train__log_every=3)
  _poison(monkeypatch, {3, 4})
  w = str(tmp_path / "w")
  with pytest.raises(NonFiniteError, match="2 steps in a row.*max_skipped=1") as info:
    run(c, w)
  # The streak went over the limit at step 4, a save step: checked before saving, so the
  # only checkpoint is step 2.
  assert info.value.step == 4 and _steps(w) == [2], (str(info.value), _steps(w))


# ----------------------------------------------------------------------------- corrupt checkpoint


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """A finished 6-step run with checkpoints at 3 and 6 (copied by the tests that damage it)."""
  c = _config(shapes_data_dir, checkpoint__every=3)
  w = str(tmp_path_factory.mktemp("trained") / "w")
  assert run(c, w)["step"] == 6
  return c, w


def _corrupt_copy(trained, dest) -> str:
  _, w = trained
  shutil.copytree(w, dest)
  damaged = 0
  for root, _, files in os.walk(os.path.join(dest, "checkpoints", "6", "state")):
    if os.path.basename(root) == "d":
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(7)
        damaged += 1
  assert damaged
  return os.fspath(dest)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_hint_pasted_into_the_command_resumes(
    trained, config_file, tmp_path, compile_cache_dir):  # noqa: F811
  w = _corrupt_copy(trained, tmp_path / "w")
  env = _cli_env(compile_cache_dir)
  cmd = _cli(config_file, w)
  r = _run_cli(cmd, env)
  assert r.returncode == 1 and "CheckpointCorruptError" in r.stderr, r.stderr[-3000:]
  # No traceback through gptjax (at exit, orbax's background threads may print asyncio's
  # "Event loop is closed" noise, which is not ours).
  assert "raise CheckpointCorruptError" not in r.stderr and 'gptjax/train' not in r.stderr, \
      r.stderr[-3000:]
  hint = re.findall(r"--config\.[\w.]+=\d+", r.stderr)
  assert hint == [step_override(3)], r.stderr
  r = _run_cli(cmd + hint, env)  # pasted literally
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 3" in r.stdout + r.stderr
  assert [x["step"] for x in train_rows(w)] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
  # The unreadable step was moved aside, so the new step 6 was written and a plain rerun
  # (without the override) reads it.
  assert os.path.isdir(os.path.join(w, "checkpoints", "6.superseded"))
  assert _steps(w) == [3, 6]
  state = _restore_all(w, _abstract(trained[0]))[6]
  assert int(state.step) == 6 and _all_finite(state)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_fallback_resumes_from_the_newest_readable(trained, tmp_path, caplog):
  c, _ = trained
  w = _corrupt_copy(trained, tmp_path / "w")
  c = _config(c.data.data_dir, checkpoint__every=3, checkpoint__fallback=True)
  with caplog.at_level("WARNING", logger="gptjax"):
    assert run(c, w)["step"] == 6
  assert "skipped unreadable step(s) [6], resumed from step 3" in caplog.text, caplog.text
  assert [x["step"] for x in train_rows(w)][-3:] == [4, 5, 6] and _steps(w) == [3, 6]


def test_recipe_hint_names_the_stage_section():
  from gptjax.compress import recipe
  err = CheckpointCorruptError(6, "/w/teacher/checkpoints/6", "OSError: x", [3])
  for section, want in (("teacher", "--config.teacher.checkpoint.step=3"),
                        ("student", "--config.student.checkpoint.step=3"), (None, None)):
    with pytest.raises(CheckpointCorruptError) as info:
      with recipe._checkpoint_hint(section):
        raise err
    msg = str(info.value)
    assert "rm -r /w/teacher/checkpoints/6" in msg
    assert "--config.checkpoint.step" not in msg, msg
    if want:
      assert want in msg, msg
    else:
      assert "checkpoint.step=" not in msg, msg


# ----------------------------------------------------------------------------- one run per workdir


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
  w = str(tmp_path)
  with lock_lib.acquire(w):
    with pytest.raises(lock_lib.WorkdirLockedError) as info:
      lock_lib.acquire(w)
    msg = str(info.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg, msg
    assert f"rm {os.path.join(w, lock_lib.LOCK_FILE)}" in msg, msg
  assert not os.path.exists(os.path.join(w, lock_lib.LOCK_FILE))
  # Another host's lock is never taken over (its pid cannot be checked from here).
  with open(os.path.join(w, lock_lib.LOCK_FILE), "w") as f:
    json.dump(dict(host="elsewhere", pid=1, started="then", command="x"), f)
  with pytest.raises(lock_lib.WorkdirLockedError, match="on host elsewhere"):
    lock_lib.acquire(w)
  assert lock_lib.acquire("gs://bucket/run").path is None  # remote: not locked


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
  w = str(tmp_path)
  path = os.path.join(w, lock_lib.LOCK_FILE)
  code = ("import sys, time; from gptjax.train.lock import acquire; acquire(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(120)")
  proc = subprocess.Popen([PYTHON, "-c", code, w], cwd=REPO_ROOT, env=python_env(),
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert json.load(open(path))["pid"] == proc.pid  # left behind by the killed process
  with caplog.at_level("WARNING", logger="gptjax"):
    held = lock_lib.acquire(w)
  assert f"pid {proc.pid}" in caplog.text and "stale" in caplog.text, caplog.text
  assert json.load(open(path))["pid"] == os.getpid()
  held.release()
  assert not os.path.exists(path)


def test_two_train_py_on_one_workdir(config_file, tmp_path, compile_cache_dir):  # noqa: F811
  env = _cli_env(compile_cache_dir)
  w = tmp_path / "w"
  lock_path = w / lock_lib.LOCK_FILE
  first_log = open(tmp_path / "first.log", "w")
  first = subprocess.Popen(_cli(config_file, w, "--config.train.steps=40"), cwd=REPO_ROOT,
                           env=env, stdout=first_log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while not lock_path.exists():
      assert first.poll() is None, (tmp_path / "first.log").read_text()
      assert time.monotonic() < deadline
      time.sleep(0.05)
    t0 = time.monotonic()
    second = _run_cli(_cli(config_file, w, "--config.train.steps=40"), env, timeout=120)
    took = time.monotonic() - t0
    assert second.returncode == 1, second.stderr[-3000:]
    assert "WorkdirLockedError" in second.stderr and f"pid {first.pid}" in second.stderr
    assert f"rm {lock_path}" in second.stderr and "Traceback" not in second.stderr
    assert took < 60, took
    assert first.poll() is None, "the first run ended before the second was refused"
    assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
    first_log.close()
  assert not lock_path.exists()
  assert [r["step"] for r in train_rows(w)] == list(range(1, 41))  # one run's rows only
  assert _steps(w) == [40]


def test_lock_released_when_run_fails(shapes_data_dir, tmp_path):  # noqa: F811
  c = _config(shapes_data_dir)
  c.data.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / lock_lib.LOCK_FILE)


# ----------------------------------------------------------------------------- unwritable / disk full


class _Reached(Exception):
  pass


def _no_training(monkeypatch):
  def sentinel(*a, **k):
    raise _Reached("run() got to building the train state")
  monkeypatch.setattr("gptjax.train.loop.create_train_state", sentinel)


def test_unwritable_workdir_is_found_before_training(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  c = _config(shapes_data_dir)
  _no_training(monkeypatch)
  (tmp_path / "file").write_text("x")
  with pytest.raises(lock_lib.WorkdirNotWritableError, match="ENOTDIR") as info:
    run(c, str(tmp_path / "file" / "w"))  # its parent is a file
  assert str(tmp_path / "file") in str(info.value)

  real_open = os.open

  def denied(path, *a, **k):  # as a read-only mount / foreign-owned directory answers
    if ".gptjax-write-probe" in os.fspath(path):
      raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
    return real_open(path, *a, **k)

  monkeypatch.setattr(os, "open", denied)
  w = tmp_path / "w"
  with pytest.raises(lock_lib.WorkdirNotWritableError, match="EACCES") as info:
    run(c, str(w))
  assert str(w) in str(info.value) and not (w / "checkpoints").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_on_save_raises_named_error_and_resume_works(trained, tmp_path, monkeypatch):
  c, _ = trained
  c = _config(c.data.data_dir, checkpoint__every=3)
  w = str(tmp_path / "w")
  original = grain.checkpoint.CheckpointHandler.save

  def full(self, directory, *a, **k):
    if os.path.basename(os.path.dirname(os.fspath(directory))).startswith("6."):
      raise OSError(errno.ENOSPC, "No space left on device", os.fspath(directory))
    return original(self, directory, *a, **k)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full)
  with pytest.raises(CheckpointSaveError, match=r"step 6 .*ENOSPC") as info:
    run(c, w)
  assert os.path.join(w, "checkpoints", "6") in str(info.value)
  assert _steps(w) == [3] and not os.path.exists(os.path.join(w, lock_lib.LOCK_FILE))
  assert _all_finite(_restore_all(w, _abstract(c))[3])
  monkeypatch.undo()
  assert run(c, w)["step"] == 6  # the rerun resumes from step 3
  assert [r["step"] for r in train_rows(w)] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
  assert _steps(w) == [3, 6]


def test_async_write_failure_surfaces_at_wait(tmp_path):
  import jax.numpy as jnp
  with Checkpointer(tmp_path / "c", save_every=1) as ckpt:
    assert ckpt.save(1, {"x": jnp.ones(3)})
    ckpt.wait()
    ckpt._in_flight = 2  # as if step 2's background write were running ...

    def fail():
      raise OSError(errno.ENOSPC, "No space left on device")

    ckpt._mgr.wait_until_finished = fail  # ... and failed
    with pytest.raises(CheckpointSaveError, match=r"step 2 .*ENOSPC"):
      ckpt.wait()
    del ckpt._mgr.wait_until_finished
  with Checkpointer(tmp_path / "c", save_every=1) as ckpt:
    assert ckpt.all_steps() == [1]



def test_suggested_overrides_parse_as_train_py_flags(diverged, config_file, tmp_path):
  """Every ``--config.*`` a recovery message suggests is accepted by the flag parser
  train.py uses, and sets what it says (the corrupt-checkpoint hint is run for real above)."""
  from absl import flags
  from ml_collections import config_flags
  from gptjax.train.data import load_split
  c, _, err = diverged
  text = _config(c.data.data_dir)
  text.data.name, text.data.task, text.data.paths = "text_files", "lm", ()
  with pytest.raises(ValueError) as paths_err:
    load_split(text, "train")
  messages = [str(err), str(paths_err.value),
              str(CheckpointCorruptError(6, "/w/checkpoints/6", "OSError: x", [3]))]
  suggested = [m for msg in messages
               for m in re.findall(r"--config\.[\w.]+=(?:'[^']*'|[^\s,;)]+)", msg)]
  assert sorted(suggested) == sorted([
      "--config.optim.lr=1e+29", "--config.optim.clip_norm=0.5",
      "--config.train.nonfinite=skip", "--config.data.paths='(\"notes/*.txt\",)'",
      "--config.checkpoint.step=3"]), suggested
  for flag in suggested:
    key, value = flag[len("--config."):].split("=", 1)
    if value.startswith("'") and value.endswith("'"):
      value = value[1:-1]  # shell quotes
    argv = ["train.py", f"--config={config_file}", f"--config.{key}={value}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    node = fv.config
    for part in key.split("."):
      node = node[part]
    assert node is not None and str(node) != "", (flag, node)


def test_guard_covers_a_custom_loss_fn():
  """The guard is in the generic step, so a trainer's own loss (distillation's, via
  RunHooks.loss_fn, with its aux argument; QAT / pruning change the module / optimizer, not
  the step) gets it too. Any nnx module trains through the step: a Linear keeps it cheap."""
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from gptjax.train.state import TrainState
  from gptjax.train.step import make_train_step
  graphdef, params, rest = nnx.split(nnx.Linear(4, 2, rngs=nnx.Rngs(0, dropout=1)),
                                     nnx.Param, ...)
  tx = optax.adam(1e-2)

  def loss_fn(m, batch, poison):  # (loss sum, count) with its own aux argument
    err = jnp.sum((m(batch["inputs"]) - batch["targets"]) ** 2)
    return jnp.where(poison > 0, jnp.nan, err), jnp.float32(batch["inputs"].shape[0])

  step = jax.jit(make_train_step(graphdef, rest, tx, loss_fn=loss_fn))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  batch = dict(inputs=np.ones((3, 4), np.float32), targets=np.zeros((3, 2), np.float32))
  bad, m = step(state, batch, jnp.float32(1))
  assert float(m["nonfinite"]) == 1 and int(bad.step) == 1
  assert _same(to_numpy(bad.params), to_numpy(state.params))
  assert _same(to_numpy(bad.opt_state), to_numpy(state.opt_state))
  good, m = step(bad, batch, jnp.float32(0))
  assert float(m["nonfinite"]) == 0 and int(good.step) == 2
  assert not _same(to_numpy(good.params), to_numpy(state.params))
