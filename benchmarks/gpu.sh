#!/usr/bin/env bash
# The GPU benchmarks in one go, for a machine with an NVIDIA GPU (run from the repository
# root): bf16 train-step MFU of GPT-2 small at T = 1,024 against the GPU's measured bf16
# matmul peak, then the attention-at-length and generation benchmarks. Writes
# $OUT/BENCHMARKS.md (tables with the GPU's name) and $OUT/results.json.
#
#   OUT=gpu_results bash benchmarks/gpu.sh
#
# Target (issue 11): >= 50 % bf16 MFU for GPT-2 small at T = 1,024.
set -euo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv .venv-gpu
  .venv-gpu/bin/pip install --quiet -e '.[gpu,bench]'
fi
export JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
.venv-gpu/bin/python - "$OUT" "${GPTJAX_GPU_PRESET:-gpt2-small}" "${GPTJAX_GPU_T:-1024}" <<'PY'
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import gptjax
from gptjax import sharding as shd
from gptjax.flops import flops_per_step, peak_matmul_flops
from gptjax.train.state import create_train_state
from gptjax.train.step import make_train_step, jit_train_step
out = sys.argv[1]
cfg = gptjax.preset(sys.argv[2], dtype="bfloat16", attention_impl="auto")
b, t = 8, int(sys.argv[3])
mesh = shd.make_mesh(data=1, devices=jax.devices()[:1])
tx = optax.adamw(3e-4)
graphdef, rest, state, sh = create_train_state(cfg, tx, mesh, 0)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int32)
batch = dict(inputs=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((b, t), np.float32))
from gptjax.batch import batch_shardings, global_batch
bs = {k: v for k, v in batch_shardings(mesh).items() if k in batch}
step = jit_train_step(make_train_step(graphdef, rest, tx), sh, bs, mesh)
g = global_batch(batch, bs)
for _ in range(3):
  state, m = step(state, g)
jax.block_until_ready(m)
times = []
for _ in range(10):
  t0 = time.perf_counter(); state, m = step(state, g); jax.block_until_ready(m)
  times.append(time.perf_counter() - t0)
dt = float(np.median(times))
peak = peak_matmul_flops("bfloat16", n=int(sys.argv[4]) if len(sys.argv) > 4 else 8192, repeats=10)
mfu = flops_per_step(cfg, b, t) / dt / peak
res = dict(device=str(jax.devices()[0].device_kind), step_s=dt, peak_flops=peak, mfu=mfu)
json.dump(res, open(f"{out}/mfu.json", "w"), indent=1)
print(f"{sys.argv[2]} bf16, B {b}, T {t}: step {dt*1e3:.1f} ms, MFU {mfu:.1%} of "
      f"{peak/1e12:.0f} TFLOP/s on {res['device']} (target >= 50 %)")
PY
.venv-gpu/bin/python -m benchmarks.run --only attention_length generate_speed --out "$OUT"
echo "wrote $OUT/"
