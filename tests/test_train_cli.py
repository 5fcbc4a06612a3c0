"""train.py as a user runs it, in subprocesses: SIGTERM saves and exits 0 and a rerun
resumes; two processes (jax.distributed on localhost, 4 CPU devices each) train like one
process with 8 devices; a mistyped config key fails naming it. Every subprocess is bounded
by a timeout and killed if it overruns."""
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from _train_helpers import (PYTHON, REPO_ROOT, compile_cache_dir,  # noqa: F401
                            persistent_compile_cache, python_env, read_metrics, shapes_data_dir,
                            tiny_vlm_config, train_rows, write_config_file)

TRAIN_PY = os.path.join(REPO_ROOT, "train.py")
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


@pytest.fixture(scope="module")
def config_file(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """configs/*.py-style file: the tiny VLM on the small shapes data, no final eval."""
  path = tmp_path_factory.mktemp("cli_config") / "tiny_vlm.py"
  return write_config_file(path, shapes_data_dir,
                           extra='c.data.eval_split = ""\nc.data.test_split = ""')


def train_cmd(config_file, workdir, *overrides):
  return [PYTHON, TRAIN_PY, f"--config={config_file}", f"--workdir={workdir}", *overrides]


def run_train(cmd, env, timeout=300) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
    pytest.fail(f"{cmd} did not finish in {timeout} s; output:\n{e.output}\n{e.stderr}")


def checkpoint_steps(workdir) -> list[int]:
  from gptjax.train.checkpoint import Checkpointer
  with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1000) as ckpt:
    return ckpt.all_steps()


def _kill(proc):
  if proc.poll() is None:
    proc.kill()
    proc.wait(timeout=30)


def train_until_sigterm(cmd, env, workdir, log_path, *, rows: int) -> tuple[int, str]:
  """Start train.py, SIGTERM it once metrics.jsonl has ``rows`` train rows (training is under
  way, its handler installed); -> (exit code, output)."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 300
      while len(train_rows(workdir)) < rows:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"no progress:\n{log_path.read_text()}"
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      rc = proc.wait(timeout=120)
    finally:
      _kill(proc)
  return rc, log_path.read_text()


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(config_file, tmp_path, compile_cache_dir):  # noqa: F811
  env = python_env(XLA_FLAGS=EIGHT_DEVICES, JAX_COMPILATION_CACHE_DIR=compile_cache_dir)
  w = tmp_path / "w"
  # Far more steps than it will get to, no periodic checkpoint before the signal.
  cmd = train_cmd(config_file, w, "--config.train.steps=2000", "--config.checkpoint.every=1000")
  rc, out = train_until_sigterm(cmd, env, w, tmp_path / "first.log", rows=2)
  assert rc == 0, out
  steps = [r["step"] for r in train_rows(w)]
  stopped = steps[-1]
  assert steps == list(range(1, stopped + 1)) and 2 <= stopped < 2000, steps
  assert f"saved step {stopped}" in out, out
  assert checkpoint_steps(w) == [stopped]  # the step it stopped at, and only that one

  # Rerunning the same command continues from there (and a second SIGTERM saves again).
  rc, out = train_until_sigterm(cmd, env, w, tmp_path / "second.log", rows=stopped + 2)
  assert rc == 0, out
  assert f"resumed from step {stopped}" in out, out
  steps = [r["step"] for r in train_rows(w)]
  again = steps[-1]
  assert steps == list(range(1, again + 1)) and again >= stopped + 2, steps  # not restarted
  assert checkpoint_steps(w) == [stopped, again]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(config_file, shapes_data_dir, tmp_path,  # noqa: F811
                                     compile_cache_dir):  # noqa: F811
  # 6 steps, as the in-process tests (the single-process run can reuse their programs).
  overrides = ["--config.train.steps=6", "--config.checkpoint.every=1000",
               "--config.data.eval_split=validation", "--config.eval.max_batches=2"]
  one, two = tmp_path / "one", tmp_path / "two"

  port = _free_port()
  procs, logs = [], []
  try:
    for i in range(2):
      env = python_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
                       JAX_PROCESS_ID=i, JAX_INIT_TIMEOUT=60)
      env.pop("JAX_COMPILATION_CACHE_DIR", None)  # two writers: no shared cache
      logs.append(open(tmp_path / f"process{i}.log", "w"))
      procs.append(subprocess.Popen(train_cmd(config_file, two, *overrides), cwd=REPO_ROOT,
                                    env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 420
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      _kill(p)
    for f in logs:
      f.close()
  outs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{outs[i]}"
  assert "'data': 8" in outs[0], outs[0]  # one mesh over the 8 devices of both processes

  # The reference: one process with 8 devices (this one: conftest.py), the same config.
  from gptjax.train.loop import run
  c = tiny_vlm_config(shapes_data_dir)
  c.data.test_split = ""
  c.checkpoint.every, c.eval.max_batches = 1000, 2
  with persistent_compile_cache(compile_cache_dir):
    assert run(c, str(one))["step"] == 6

  rows1, rows2 = read_metrics(one), read_metrics(two)  # process 0 writes the metrics
  train1 = [(x["step"], x["loss"], x["grad_norm"]) for x in rows1 if x["split"] == "train"]
  train2 = [(x["step"], x["loss"], x["grad_norm"]) for x in rows2 if x["split"] == "train"]
  assert [s for s, _, _ in train1] == [s for s, _, _ in train2] == [1, 2, 3, 4, 5, 6]
  # Same global batches (each process reads its half) and the same updates: equal up to
  # float reduction order.
  np.testing.assert_allclose([l for _, l, _ in train2], [l for _, l, _ in train1], rtol=1e-5)
  np.testing.assert_allclose([g for _, _, g in train2], [g for _, _, g in train1], rtol=1e-4)
  assert train1[-1][1] < train1[0][1] or train1[-1][2] != train1[0][2]  # it trained
  eval1 = [x for x in rows1 if x["split"] == "eval"]
  eval2 = [x for x in rows2 if x["split"] == "eval"]
  assert len(eval1) == len(eval2) == 1
  assert eval1[0]["tokens"] == eval2[0]["tokens"] > 0
  np.testing.assert_allclose(eval2[0]["loss"], eval1[0]["loss"], rtol=1e-5)
  assert checkpoint_steps(two) == checkpoint_steps(one) == [6]


def test_unknown_config_key_fails_naming_it(config_file, tmp_path):
  r = run_train(train_cmd(config_file, tmp_path / "w", "--config.optim.lrr=1"),
                python_env(XLA_FLAGS=EIGHT_DEVICES), timeout=120)
  assert r.returncode != 0
  assert "lrr" in r.stderr, r.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()  # failed before doing anything
