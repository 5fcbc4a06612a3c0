"""gptjax.flops against a hand count and against XLA's own FLOP count, and MFU / tokens/s
in a training run's metrics.jsonl."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from gptjax.batch import token_losses
from gptjax.config import ModelConfig, preset
from gptjax.flops import flops_per_step, flops_per_token, peak_matmul_flops
from gptjax.model import GPT

from _train_helpers import train_rows


def test_gpt2_small_matches_hand_count():
  cfg = preset("gpt2-small")  # D 768, 12 heads of 64, 12 layers, F 3072, V 50257, tied
  T = 1024
  per_layer = (3 * 768 * 768  # q, k, v
               + 768 * 768  # output projection
               + 768 * 3072 + 3072 * 768)  # MLP up + down
  n_mm = 12 * per_layer + 768 * 50257  # + the tied LM head (a matmul against the table)
  assert n_mm == 123_532_032
  attention = 12 * 4 * T * 768 / 2  # QK^T and PV, causal: half of 4*T*N*H per layer
  assert flops_per_token(cfg, T) == 3 * (2 * n_mm + attention) == 797_815_296
  assert flops_per_token(cfg, T, train=False) == 2 * n_mm + attention
  assert flops_per_step(cfg, 8, T) == 8 * T * 797_815_296


def test_tiny_gqa_and_swiglu_match_hand_count():
  cfg = preset("tiny")  # D 32, 4 query heads of 8, 2 kv heads, F 64, 2 layers, V 260
  T = 64
  per_layer = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32 + 32 * 64 + 64 * 32
  assert per_layer == 7168
  n_mm = 2 * per_layer + 32 * 260
  fwd = 2 * n_mm + 2 * 2 * T * 4 * 8  # causal attention: 2*T*N*H per layer
  assert flops_per_token(cfg, T, train=False) == fwd == 53_504
  sw = preset("tiny", mlp_activation="swiglu")  # gate + up: one more D x F matmul
  assert flops_per_token(sw, T, train=False) == fwd + 2 * 2 * (32 * 64)
  # Shared blocks still cost FLOPs every time they are applied.
  assert flops_per_token(preset("tiny", num_unique_layers=1), T) == flops_per_token(cfg, T)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_seq_len_is_named(bad):
  with pytest.raises(ValueError, match="seq_len"):
    flops_per_token(preset("tiny"), bad)


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_matches_xla_cost_analysis():
  """XLA counts what the compiled program runs: the einsum attention computes the full
  T x T logits (then masks them), so compare with the bidirectional count; the rest of
  XLA's count is elementwise work (norms, softmax, GELU, cross-entropy): within 6 %.
  (Measured: 2.2 % for the forward alone and for forward + backward.)"""
  train = True
  cfg = ModelConfig(vocab_size=256, max_seq_len=16, width=128, depth=2, num_heads=4)
  b, t = 2, 16
  graphdef, params, rest = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

  def loss(p, x):
    return jnp.sum(token_losses(nnx.merge(graphdef, p, rest)(x), x))

  x = jnp.zeros((b, t), jnp.int32)
  xla = _xla_flops(jax.grad(loss) if train else loss, params, x)
  ours = b * t * flops_per_token(cfg, t, train=train, causal=False)
  assert 1.0 <= xla / ours < 1.06, (xla, ours)


def test_peak_is_measured_once_and_plausible():
  a = peak_matmul_flops("float32", n=256, repeats=2)
  assert peak_matmul_flops("float32", n=256, repeats=2) == a  # cached
  assert 1e8 < a < 1e16
  with pytest.raises(ValueError, match="dtype"):
    peak_matmul_flops("int8")


def test_peak_is_kept_on_disk_per_machine(tmp_path, monkeypatch):
  """A second process (here: the in-process cache cleared) reads the peak instead of
  measuring; a stale, corrupt or disabled cache measures again."""
  import json
  import time

  from gptjax import flops
  monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
  path = tmp_path / flops.PEAK_CACHE_FILE
  peak_matmul_flops.cache_clear()
  a = peak_matmul_flops("float32", n=128, repeats=1)
  (entry,) = json.loads(path.read_text()).values()
  assert entry["flops"] == a and abs(entry["measured"] - time.time()) < 60
  peak_matmul_flops.cache_clear()
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *args: pytest.fail("measured again"))
  assert peak_matmul_flops("float32", n=128, repeats=1) == a
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *args: 123.0)
  assert flops.peak_matmul_flops.__wrapped__("float32", n=256, repeats=1) == 123.0  # other key
  data = json.loads(path.read_text())
  assert len(data) == 2
  for entry in data.values():
    entry["measured"] -= (flops.PEAK_CACHE_DAYS + 1) * 86400  # a week old: stale
  path.write_text(json.dumps(data))
  assert flops.peak_matmul_flops.__wrapped__("float32", n=128, repeats=1) == 123.0
  path.write_text("{half a fi")
  assert flops.peak_matmul_flops.__wrapped__("float32", n=128, repeats=1) == 123.0
  assert len(json.loads(path.read_text())) == 1  # rewritten whole
  monkeypatch.setenv("GPTJAX_CACHE_DIR", "none")
  path.unlink()
  assert flops.peak_matmul_flops.__wrapped__("float32", n=128, repeats=1) == 123.0
  assert not path.exists() and flops.peak_cache_path() is None
  peak_matmul_flops.cache_clear()


def _lm_config(tmp_path, **logging):
  from gptjax.runs import base_config
  from gptjax.train.config import model_section
  text = tmp_path / "corpus.txt"
  text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
  c = base_config()
  c.model = model_section("tiny", max_seq_len=32)
  c.data.name, c.data.task, c.data.paths = "text_files", "lm", (str(text),)
  c.data.data_dir = str(tmp_path / "data")
  c.data.seq_len = 32
  c.data.test_split = ""
  c.train.steps, c.train.batch_size, c.train.log_every = 4, 8, 2
  c.eval.every, c.eval.at_end = 0, False
  c.checkpoint.every = 100
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  c.logging.update(logging)
  return c


def test_training_log_has_mfu_and_tokens_per_s(tmp_path):
  from gptjax.train.loop import run
  peak = 1e11  # given: no measurement, so the logged mfu is checkable exactly
  c = _lm_config(tmp_path, peak_flops=peak)
  run(c, str(tmp_path / "w"))
  rows = train_rows(tmp_path / "w")
  assert [r["step"] for r in rows] == [2, 4]
  cfg = preset("tiny", max_seq_len=32)
  for r in rows:
    dt = r["step_time_s"]
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / dt, rel=1e-9)
    want = 8 * 32 * (3 * (2 * 22656 + 2 * 2 * 32 * 32)) / dt / peak  # hand count, T = 32
    assert r["mfu"] == pytest.approx(want, rel=1e-9) and 0 < r["mfu"] < 1


def test_mfu_off_measures_nothing_and_bad_peak_is_named(monkeypatch):
  from gptjax.train import metrics
  monkeypatch.setattr(metrics, "peak_matmul_flops", lambda *a: pytest.fail("measured"))
  off = metrics.Throughput(preset("tiny"), ml_collections.ConfigDict(dict(mfu=False)))
  off.set_step(256, 1e9)
  assert off.rates(0.5) == {"tokens_per_s": 512.0}
  assert "mfu" not in off.postfix(dict(loss=1.0, step_time_s=0.5, tokens_per_s=512.0))
  with pytest.raises(ValueError, match="logging.peak_flops"):
    metrics.Throughput(preset("tiny"), ml_collections.ConfigDict(dict(mfu=True, peak_flops=-1.0)))
