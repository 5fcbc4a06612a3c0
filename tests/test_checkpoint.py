"""gptjax.train.checkpoint (and .preemption): round trips, data-iterator state, retention, resharding, crash safety,
clear errors, and the preemption watcher. Runs on the 8 fake CPU devices from conftest.py."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.train.checkpoint import (TMP_DIR_SUFFIX, CheckpointCorruptError,
                                     CheckpointMismatchError, Checkpointer, abstract_like)
from gptjax.train.preemption import PreemptionWatcher

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


@jax.jit
def _updated_opt_state(params):
  """adamw state after one real update, so the moments and count are non-trivial."""
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p * 3.0 + 1.0), params)
  return tx.update(grads, opt_state, params)[1]


def make_state(out_features=3, use_bias=True, seed=0, step=7):
  model = nnx.Linear(4, out_features, use_bias=use_bias, rngs=nnx.Rngs(seed),
                     kernel_metadata={"logical_axes": ("embed", "mlp")})
  _, params, _ = nnx.split(model, nnx.Param, ...)
  opt_state = _updated_opt_state(params)
  rng = jax.random.key_data(jax.random.key(seed + 123))
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                    rng=rng)


def assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8),
                                  err_msg=jax.tree_util.keystr(path))


def test_round_trip_train_state_bit_equal(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path / "ckpt", save_every=10) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state)
    ckpt.wait()
    assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
  # A fresh Checkpointer (as after a restart) on a target built from a different seed.
  with Checkpointer(tmp_path / "ckpt", save_every=10) as ckpt:
    target = abstract_like(make_state(seed=5, step=0))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target))
    restored = ckpt.restore(target)
  assert isinstance(restored, TrainState)
  assert_bit_equal(restored, state)  # also checks identical tree structure (Param metadata)
  kernel = restored.params["kernel"]
  assert isinstance(kernel, nnx.Param)
  assert kernel.get_metadata()["logical_axes"] == ("embed", "mlp")
  assert restored.rng.dtype == jnp.uint32
  assert int(restored.step) == 7 and restored.step.dtype == jnp.int32


def test_save_policy_force_and_no_overwrite(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, save_every=5, async_save=False) as ckpt:
    assert ckpt.should_save(10) and not ckpt.should_save(7)
    assert not ckpt.save(7, state)
    assert ckpt.all_steps() == []
    assert ckpt.save(7, state, force=True)
    assert ckpt.save(10, state)
    assert not ckpt.save(10, state, force=True)  # existing step: never overwritten
    assert ckpt.all_steps() == [7, 10]


def test_typed_keys_rejected(tmp_path):
  state = make_state().replace(rng=jax.random.key(0))
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    with pytest.raises(TypeError, match="key_data"):
      ckpt.save(1, state)


def _dataset():
  return grain.MapDataset.range(100).shuffle(seed=0).batch(4)


class RangeSource:
  def __len__(self):
    return 100

  def __getitem__(self, i):
    return np.int64(i)

  def __repr__(self):  # grain compares it on restore: must be stable
    return "RangeSource(100)"


def _loader():
  sampler = grain.samplers.IndexSampler(num_records=100, shard_options=grain.sharding.NoSharding(),
                                        shuffle=True, num_epochs=1, seed=0)
  return grain.DataLoader(data_source=RangeSource(), sampler=sampler,
                          operations=[grain.transforms.Batch(4)], worker_count=0)


@pytest.mark.parametrize("make_iter", [lambda: iter(_dataset()), lambda: iter(_loader())],
                         ids=["map_dataset", "data_loader"])
def test_data_iterator_state(tmp_path, make_iter):
  # Large enough that the async write is still running while we advance the iterator.
  state = {"w": jnp.arange(2_000_000, dtype=jnp.float32), "step": jnp.int32(3)}
  it = make_iter()
  seen = [np.asarray(next(it)) for _ in range(3)]
  with Checkpointer(tmp_path, save_every=3) as ckpt:
    assert ckpt.save(3, state, it)
    expected = [np.asarray(next(it)) for _ in range(2)]  # advanced after save, before wait
  assert not np.array_equal(expected[0], seen[0])
  fresh = make_iter()
  with Checkpointer(tmp_path, save_every=3) as ckpt:
    restored = ckpt.restore(abstract_like(state), fresh)
  np.testing.assert_array_equal(restored["w"], state["w"])
  for want in expected:
    np.testing.assert_array_equal(np.asarray(next(fresh)), want)


def test_restore_without_iterator_state_is_clear(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state)
    with pytest.raises(CheckpointMismatchError, match="no data-iterator state"):
      ckpt.restore(abstract_like(state), iter(_dataset()))


def test_keep_last_k(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
  assert sorted(p for p in os.listdir(tmp_path)) == ["4", "5"]


def test_reshard_to_different_mesh(tmp_path):
  devices = np.array(jax.devices())
  assert devices.size == 8, "needs 8 (fake) devices, see conftest.py"
  axes = ("data", "fsdp", "tensor")
  mesh_a = Mesh(devices.reshape(8, 1, 1), axes)
  mesh_b = Mesh(devices.reshape(2, 2, 2), axes)
  a = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
  b = jnp.arange(8 * 16, dtype=jnp.int32).reshape(8, 16) * 3
  state = {
      "a": jax.device_put(a, NamedSharding(mesh_a, P("data", None))),
      "b": jax.device_put(b, NamedSharding(mesh_a, P(None, "data"))),
      "step": jax.device_put(jnp.int32(4), NamedSharding(mesh_a, P())),
  }
  with Checkpointer(tmp_path, save_every=4) as ckpt:
    assert ckpt.save(4, state)
  targets = {
      "a": NamedSharding(mesh_b, P(("data", "fsdp"), "tensor")),
      "b": NamedSharding(mesh_b, P("tensor", ("data", "fsdp"))),
      "step": NamedSharding(mesh_b, P()),
  }
  with Checkpointer(tmp_path, save_every=4) as ckpt:
    restored = ckpt.restore(abstract_like(state, targets))
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored[k].sharding == targets[k], k
    assert restored[k].sharding != state[k].sharding or k == "step"
  assert restored["a"].addressable_shards[0].data.shape == (4, 4)
  assert restored["b"].addressable_shards[0].data.shape == (4, 4)


def test_abstract_like_sharding_trees():
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  state = make_state(out_features=8)
  row, rep = NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P())
  # Same structure, Variables holding shardings (what gptjax.sharding.state_shardings returns).
  full = jax.tree.map(lambda x: row if x.ndim == 2 else rep, state)
  abstract = abstract_like(state, full)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert abstract.params["kernel"].get_value().sharding == row
  assert abstract.params["bias"].get_value().sharding == rep
  # A prefix tree, a single sharding, and None (keep each array's own sharding).
  vec = NamedSharding(mesh, P("data"))
  prefix = abstract_like({"a": state, "b": jnp.zeros(8)}, {"a": rep, "b": vec})
  assert prefix["a"].params["kernel"].get_value().sharding == rep and prefix["b"].sharding == vec
  assert all(x.sharding == rep for x in jax.tree.leaves(abstract_like(state, rep)))
  own = abstract_like(state).params["kernel"].get_value()
  assert own.sharding == state.params["kernel"].get_value().sharding and own.shape == (4, 8)


def _simulate_interrupted_save(directory, good_step, bad_step):
  """What orbax 0.12 leaves when a process dies mid-save: `<step>.orbax-checkpoint-tmp` holding
  `_CHECKPOINT_METADATA` and half-written `<item>.orbax-checkpoint-tmp` dirs, no
  commit_success.txt (observed by listing the directory during a real async save)."""
  tmp = directory / f"{bad_step}{TMP_DIR_SUFFIX}"
  shutil.copytree(directory / str(good_step), tmp)
  (tmp / "commit_success.txt").unlink(missing_ok=True)
  os.rename(tmp / "state", tmp / f"state{TMP_DIR_SUFFIX}")
  for f in (tmp / f"state{TMP_DIR_SUFFIX}").rglob("*"):
    if f.is_file() and f.name != "_METADATA":
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated writes
  return tmp


def test_interrupted_save_is_ignored(tmp_path):
  state1, state2 = make_state(step=1), make_state(seed=1, step=2)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state1)
  leftover = _simulate_interrupted_save(tmp_path, 1, 2)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    assert_bit_equal(ckpt.restore(abstract_like(state1)), state1)
    # The run continues: step 2 is saved again over the leftover, cleanly.
    assert ckpt.save(2, state2)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    assert_bit_equal(ckpt.restore(abstract_like(state2)), state2)
  assert not leftover.exists()


def test_killed_mid_save_leaves_last_good_step(tmp_path):
  """A real crash: a subprocess starts an async save of a big array and exits at once."""
  script = textwrap.dedent(f"""
      import os, jax.numpy as jnp
      from gptjax.train.checkpoint import Checkpointer
      ckpt = Checkpointer({str(tmp_path)!r}, save_every=1)
      ckpt.save(1, {{"w": jnp.full((4,), 1.0)}})
      ckpt.wait()
      ckpt.save(2, {{"w": jnp.full((16_000_000,), 2.0)}})
      # Die while the background write of step 2 is in flight: once its temporary directory
      # exists (on a loaded machine the writer thread may not have started at once; exiting
      # before it does would test nothing).
      import time
      tmp = os.path.join({str(tmp_path)!r}, "2" + {TMP_DIR_SUFFIX!r})
      deadline = time.time() + 60
      while not os.path.exists(tmp) and time.time() < deadline:
        time.sleep(0.001)
      os._exit(0)
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120,
                 capture_output=True)
  assert (tmp_path / f"2{TMP_DIR_SUFFIX}").exists(), os.listdir(tmp_path)
  assert not (tmp_path / "2").exists()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() == 1
    restored = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(restored["w"], np.ones(4, np.float32))


# Orbax leaves a read coroutine behind when tensorstore fails ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_all", "truncate_data", "remove"])
def test_corrupt_checkpoint_clear_error(tmp_path, damage):
  # "truncate_data" damages only the big array's chunk file: the tree metadata still reads,
  # so the failure surfaces inside Orbax's restore rather than in our metadata check.
  state = {"train": make_state(), "big": jnp.arange(100_000, dtype=jnp.float32)}
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state)
    ckpt.save(2, state)
  files = sorted((f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file()),
                 key=lambda f: f.stat().st_size)
  if damage == "truncate_data":
    files[-1].write_bytes(files[-1].read_bytes()[:1000])
  for f in files:
    if damage == "remove" and f.name != "_CHECKPOINT_METADATA":
      f.unlink()
    elif damage == "truncate_all" and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:7])
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() == 2
    with pytest.raises(CheckpointCorruptError) as info:
      ckpt.restore(abstract_like(state))
    msg = str(info.value)
    print(msg)
    assert isinstance(info.value, RuntimeError)
    assert str(tmp_path / "2") in msg and "step 2" in msg
    assert "--config.checkpoint.step=1" in msg and "delete" in msg  # the flag train.py takes
    assert info.value.__cause__ is not None
    assert_bit_equal(ckpt.restore(abstract_like(state), step=1), state)


def test_missing_step_is_clear(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="no finalized checkpoint"):
      ckpt.restore(abstract_like(state))
    ckpt.save(1, state)
    with pytest.raises(FileNotFoundError, match=r"step 5 not found.*\[1\]"):
      ckpt.restore(abstract_like(state), step=5)


def test_shape_mismatch_clear_error(tmp_path):
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, make_state(out_features=3))
    with pytest.raises(CheckpointMismatchError) as info:
      ckpt.restore(abstract_like(make_state(out_features=5)))
  msg = str(info.value)
  print(msg)
  assert isinstance(info.value, ValueError)
  assert "params.kernel.value" in msg and "(4, 3)" in msg and "(4, 5)" in msg
  assert str(tmp_path / "1") in msg


def test_structure_mismatch_clear_error(tmp_path):
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, make_state(use_bias=True))
    with pytest.raises(CheckpointMismatchError,
                       match=r"in the checkpoint but not in the model.*params\.bias\.value"):
      ckpt.restore(abstract_like(make_state(use_bias=False)))
    extra = make_state()
    extra = {"train": extra, "ema": extra.params}
    with pytest.raises(CheckpointMismatchError, match="in the model but not in the checkpoint"):
      ckpt.restore(abstract_like(extra))


class _Sentinel:
  """Stand-in SIGTERM handler so that a watcher that fails to install cannot kill pytest."""

  def __init__(self):
    self.calls = 0

  def __call__(self, signum, frame):
    self.calls += 1


def _wait_for(pred, timeout=2.0):
  deadline = time.monotonic() + timeout
  while not pred() and time.monotonic() < deadline:
    time.sleep(0.005)
  return pred()


def test_preemption_watcher_sigterm():
  sentinel = _Sentinel()
  original = signal.signal(signal.SIGTERM, sentinel)
  try:
    with PreemptionWatcher() as watcher:
      assert signal.getsignal(signal.SIGTERM) is not sentinel
      assert not watcher.should_stop(0)
      os.kill(os.getpid(), signal.SIGTERM)
      assert _wait_for(lambda: watcher.should_stop(1))
      assert watcher.received == signal.SIGTERM
    assert sentinel.calls == 0
    assert signal.getsignal(signal.SIGTERM) is sentinel  # previous handler restored
  finally:
    signal.signal(signal.SIGTERM, original)


def test_preemption_watcher_sigint_twice_is_hard_stop():
  before = signal.getsignal(signal.SIGINT)
  with PreemptionWatcher() as watcher:
    os.kill(os.getpid(), signal.SIGINT)
    assert _wait_for(watcher.should_stop)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      _wait_for(lambda: False, timeout=1.0)
  assert signal.getsignal(signal.SIGINT) is before
