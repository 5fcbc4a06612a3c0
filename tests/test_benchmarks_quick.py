"""`python -m benchmarks.run --quick --only train_speed` end to end (a temp --out dir, never the
repository's BENCHMARKS.md): it runs, writes results.json with both sides timed, and puts the
generated section between the markers of BENCHMARKS.md, keeping what was there."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from _train_helpers import PYTHON, REPO_ROOT, python_env


def test_quick_train_speed_writes_results_and_markdown(tmp_path):
  pytest.importorskip("torch")  # the `bench` extra
  md = tmp_path / "BENCHMARKS.md"
  md.write_text("# Benchmarks\n\nhand-written intro\n\n"
                "<!-- benchmarks.run:begin -->\nstale\n<!-- benchmarks.run:end -->\n\nhand-written end\n")
  env = python_env()
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run has
  p = subprocess.run([PYTHON, "-m", "benchmarks.run", "--quick", "--only", "train_speed",
                      "--out", str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["quick"] and res["machine"]["cores"] == os.cpu_count()
  r = res["results"]["train_speed"]["steps"]["quick"]
  for side in ("gptjax", "torch eager"):
    assert len(r["per_step_s"][side]) == r["repeats"] >= 1
    assert r["median_s"][side] > 0 and 0 < r["mfu"][side] < 1
  text = md.read_text()
  assert text.startswith("# Benchmarks\n\nhand-written intro\n\n")
  assert text.endswith("\n\nhand-written end\n") and "stale" not in text
  assert text.count("<!-- benchmarks.run:begin") == 1 and "| quick 1x32" in text
  assert "--quick --only train_speed" in text


def test_unknown_benchmark_is_named():
  from benchmarks.run import main
  with pytest.raises(ValueError, match="--only.*train_speed"):
    main(["--only", "nope", "--out", "/nonexistent"])


def test_gpu_script_parses():
  """benchmarks/gpu.sh runs only where a GPU is lent; here it must at least be valid bash
  (its inline Python was run on CPU with GPTJAX_GPU_PRESET=tiny when written)."""
  import subprocess
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "gpu.sh")
  r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_quick_int8_decode_runs_every_variant():
  """The int8 decode benchmark's machinery at tiny shapes (one batch size): every variant
  timed, int8 weights ~1/4 of float32's bytes, quantized logits close but not equal."""
  from benchmarks import int8_decode
  res = int8_decode.run(quick=True)
  names = ("float32", "int8 w", "int8 w+a", "int8 w+a static")
  for b, row in res["batches"].items():
    assert tuple(row) == names, row.keys()
    for n, r in row.items():
      assert len(r["runs_s"]) == res["repeats"] and r["peak_bytes"] > 0, (b, n)
  wb = res["weight_bytes"]
  assert all(wb[n] < 0.4 * wb["float32"] for n in names[1:]), wb
  assert all(0 < res["numerics"][n]["rel_error"] < 0.1 for n in names[1:]), res["numerics"]
  assert "| 2 | int8 w+a |" in int8_decode.table(res)


@pytest.mark.parametrize("key", ["a", "c"])
def test_matmul_kernels_cover_the_steps_matmul_flops(key):
  """The weight matmuls the kernel benchmark times are the step's: forward + the two
  gradients of every weight matmul sum to 3 x 2 x N_mm x tokens (``gptjax.flops``'
  independent count of the weights applied per token, head included)."""
  from benchmarks import matmul_kernels, train_speed
  from gptjax.flops import matmul_params
  s = train_speed.SHAPES[key]
  rows = matmul_kernels.step_matmuls(s)
  total = sum(count * 2 * m * k * n for _, m, k, n, _, count in rows)
  tokens = s["batch"] * s["seq"]
  assert total == 6 * matmul_params(train_speed.model_config(s)) * tokens
  assert {layout for *_, layout, _ in rows} == {"NN", "NT", "TN"}


@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
def test_matmul_kernels_pairs_compute_the_same_product(layout):
  """Both timed calls compute (m, k) @ (k, n) from operands stored per the layout: checked
  against NumPy on the operands transposed back."""
  import numpy as np

  from benchmarks import matmul_kernels
  jax_call, torch_call = matmul_kernels._pair(24, 16, 8, layout, seed=3)
  rng = np.random.default_rng(3)
  a = rng.standard_normal((16, 24) if layout[0] == "T" else (24, 16), dtype=np.float32)
  b = rng.standard_normal((8, 16) if layout[1] == "T" else (16, 8), dtype=np.float32)
  want = (a.T if layout[0] == "T" else a) @ (b.T if layout[1] == "T" else b)
  np.testing.assert_allclose(np.asarray(jax_call()), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(torch_call().numpy(), want, rtol=1e-4, atol=1e-4)
  assert want.shape == (24, 8)
