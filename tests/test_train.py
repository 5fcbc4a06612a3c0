"""The training system in-process (8 fake CPU devices from conftest.py): the jitted step
(overfitting, sharding equivalence, gradient accumulation), ``run()`` resume and
preemption, resharding a saved train state, and clear errors for bad input.

References are independent of the code path under test: a 1-device run for the sharded
ones, the full batch for accumulation, an uninterrupted run for resume, a freshly advanced
pipeline for the data-iterator position.
"""
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from _train_helpers import (assert_trees_close, compile_cache_dir, persistent_compile_cache,  # noqa: F401
                            shapes_data_dir, tiny_vlm_config, to_numpy, train_rows)
from gptjax import sharding as shd
from gptjax.train.checkpoint import CheckpointCorruptError, Checkpointer
from gptjax.train.preemption import PreemptionWatcher
from gptjax.batch import MODEL_KEYS, batch_shardings, global_batch
from gptjax.data.tokenizers import ByteTokenizer
from gptjax.train.config import base_config, model_section, validate
from gptjax.train.data import load_split, pipeline_for
from gptjax.train.loop import run
from gptjax.train.optim import make_optimizer
from gptjax.train.state import abstract_train_state, create_train_state
from gptjax.train.step import jit_train_step, make_eval_step, make_train_step


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(compile_cache_dir):  # noqa: F811
  with persistent_compile_cache(compile_cache_dir):
    yield


def mesh_of(shape):
  n = int(np.prod(shape))
  return shd.make_mesh(*shape, devices=jax.devices()[:n])


def first_train_batch(c) -> dict:
  pipe = pipeline_for(c, load_split(c, c.data.train_split), train=True,
                      batch_size=c.train.batch_size)
  return {k: v for k, v in next(pipe).items() if k in MODEL_KEYS}


# ----------------------------------------------------------------------------- the step


class StepSetup:
  """The tests' tiny VLM (dims divide by 8), its optimizer, initial state and one batch."""

  def __init__(self, data_dir):
    c = tiny_vlm_config(data_dir)
    self.c = c
    self.mcfg = validate(c)
    self.tx = make_optimizer(c)
    # Initialised on run()'s own mesh (8, 1, 1): the same program as run()'s.
    run_mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    self.graphdef, self.rest, state, _ = create_train_state(self.mcfg, self.tx, run_mesh, c.seed)
    self.init_state = to_numpy(state)  # host copy: every run starts from these exact values
    self.batch = first_train_batch(c)
    self._steps = {}

  def step_fn(self, mesh, accum_steps=1):
    key = (tuple(mesh.shape.values()), mesh.devices.size, accum_steps)
    if key not in self._steps:
      sh = shd.state_shardings(self.init_state, mesh)
      bsh = {k: v for k, v in batch_shardings(mesh).items() if k in self.batch}
      fn = jit_train_step(make_train_step(self.graphdef, self.rest, self.tx,
                                          accum_steps=accum_steps), sh, bsh, mesh)
      self._steps[key] = (fn, sh, bsh)
    return self._steps[key]

  def run(self, mesh, n, *, accum_steps=1, until=None):
    """n steps from the initial state on ``mesh``; -> (losses, final state, step metrics)."""
    fn, sh, bsh = self.step_fn(mesh, accum_steps)
    state = jax.device_put(self.init_state, sh)
    b = global_batch(self.batch, bsh)
    losses, metrics = [], None
    for _ in range(n):
      state, metrics = fn(state, b)
      losses.append(float(metrics["loss"]))
      if until is not None and losses[-1] < until:
        break
    return losses, state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def setup(shapes_data_dir):  # noqa: F811
  return StepSetup(shapes_data_dir)


def test_overfits_one_batch(setup):
  losses, _, _ = setup.run(mesh_of((1, 1, 1)), 400, until=0.05)
  assert np.isfinite(losses).all()
  assert losses[0] > 4.0, losses[0]  # ~log(264) = 5.6 at init: not trivially solved
  print(f"overfit: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.4f}")
  assert losses[-1] < 0.05, (len(losses), losses[::25], losses[-1])


def _spec_axes(spec) -> set:
  out = set()
  for s in spec:
    if s is not None:
      out.update((s,) if isinstance(s, str) else s)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8)],
                         ids=["data8", "fsdp8", "tensor8"])
def test_sharded_steps_match_one_device(setup, shape):
  ref_losses, ref_state, _ = setup.run(mesh_of((1, 1, 1)), 3)
  mesh = mesh_of(shape)
  losses, state, _ = setup.run(mesh, 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  assert ref_losses[2] < ref_losses[0]  # it trains
  assert_trees_close(state.params, ref_state.params, atol=1e-5, what="params")
  assert_trees_close(state.opt_state, ref_state.opt_state, atol=1e-5, what="opt_state")
  assert int(state.step) == 3
  # The params really live on the mesh as the rules say: every mesh axis of size > 1 other
  # than pure data parallelism shards at least one kernel.
  used = set()
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.mesh.shape == mesh.shape
    used |= _spec_axes(leaf.sharding.spec)
  wanted = {a for a, n in mesh.shape.items() if n > 1 and a != "data"}
  assert wanted <= used, (wanted, used)
  assert "data" not in used  # data parallelism replicates params


def test_gradient_accumulation_matches_full_batch(setup):
  # The two halves of the batch hold different numbers of loss tokens, so averaging the
  # micro-batch means instead of dividing the summed losses once would not match.
  mask = setup.batch["loss_mask"]
  assert mask[:4].sum() != mask[4:].sum()
  mesh = mesh_of((1, 1, 1))
  full_losses, full_state, full_m = setup.run(mesh, 1)
  acc_losses, acc_state, acc_m = setup.run(mesh, 1, accum_steps=2)
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-6)
  assert float(acc_m["tokens"]) == float(full_m["tokens"]) == float(mask.sum())
  np.testing.assert_allclose(acc_m["grad_norm"], full_m["grad_norm"], rtol=1e-5)
  assert_trees_close(acc_state.params, full_state.params, atol=1e-5, what="params")
  # And the step moved the params (so equality is not vacuous).
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(to_numpy(full_state.params)), jax.tree.leaves(setup.init_state.params)))
  assert moved > 1e-3


# ----------------------------------------------------------------------------- run()


def _fresh_state(c, mesh=None):
  """(freshly initialised train state, abstract state with the shardings ``mesh`` gives it)
  for restoring run() output; ``mesh`` defaults to the run's own mesh."""
  run_mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  _, _, state, sh = create_train_state(validate(c), make_optimizer(c), run_mesh, c.seed)
  if mesh is not None:
    sh = shd.state_shardings(state, mesh)  # what create_train_state would give on `mesh`
  return state, abstract_train_state(state, sh)


def _restore(workdir, abstract, step=None, iterator=None):
  with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1000) as ckpt:
    return to_numpy(ckpt.restore(abstract, iterator, step=step))


def _fresh_pipeline(c):
  return pipeline_for(c, load_split(c, c.data.train_split), train=True,
                      batch_size=c.train.batch_size)


@pytest.mark.slow
def test_resume_after_preemption_matches_straight_run(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  c.train.steps, c.checkpoint.every = 6, 3
  c.data.eval_split = c.data.test_split = ""  # no final eval: only the training is compared
  a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")

  summary_a = run(c, a)
  assert summary_a["step"] == 6 and not summary_a["preempted"]

  # Run B is "preempted" at step 3 (as if SIGTERM arrived then), then simply rerun.
  original = PreemptionWatcher.should_stop
  monkeypatch.setattr(PreemptionWatcher, "should_stop",
                      lambda self, step=None: step == 3 or original(self, step))
  summary_b1 = run(c, b)
  assert summary_b1["preempted"] and summary_b1["step"] == 3
  assert [r["step"] for r in train_rows(b)] == [1, 2, 3]
  monkeypatch.undo()
  summary_b2 = run(c, b)
  assert summary_b2["step"] == 6 and not summary_b2["preempted"]

  rows_a, rows_b = train_rows(a), train_rows(b)
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]  # continued, not restarted
  np.testing.assert_allclose([r["loss"] for r in rows_b], [r["loss"] for r in rows_a],
                             rtol=1e-6)
  np.testing.assert_allclose([r["lr"] for r in rows_b], [r["lr"] for r in rows_a], rtol=1e-7)

  _, abstract = _fresh_state(c)
  for step in (3, 6):
    sa, sb = _restore(a, abstract, step), _restore(b, abstract, step)
    assert int(sa.step) == int(sb.step) == step
    assert_trees_close(sb, sa, atol=1e-6, what=f"state@{step}")

  # The data position: the next batch after the saved step is the same in both, and is the
  # 7th batch of a fresh pipeline (an independent reference).
  pipe_a, pipe_b, ref = _fresh_pipeline(c), _fresh_pipeline(c), _fresh_pipeline(c)
  _restore(a, abstract, 6, pipe_a.iterator)
  _restore(b, abstract, 6, pipe_b.iterator)
  for _ in range(6):
    next(ref)
  want = next(ref)
  for got in (next(pipe_a), next(pipe_b)):
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_checkpoint_from_data_mesh_restores_on_2x2x2(shapes_data_dir, tmp_path):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)  # 6 steps, as the resume test (shares its programs)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
  c.data.eval_split = c.data.test_split = ""
  w = str(tmp_path / "w")
  assert run(c, w)["step"] == 6

  fresh, abstract_811 = _fresh_state(c)
  saved = _restore(w, abstract_811)  # on the (8, 1, 1) mesh it was trained on
  mesh = shd.make_mesh(2, 2, 2)
  _, abstract_222 = _fresh_state(c, mesh)
  with Checkpointer(os.path.join(w, "checkpoints"), save_every=1000) as ckpt:
    restored = ckpt.restore(abstract_222)
  assert int(restored.step) == 6
  assert_trees_close(restored, saved, atol=0, what="resharded")
  # Adam moments are non-zero after training and params moved from their initial values: a
  # restore that skipped or mixed up arrays would show.
  assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(to_numpy(restored.opt_state))
             if x.ndim >= 2)
  for a, b in zip(jax.tree.leaves(to_numpy(fresh.params)),
                  jax.tree.leaves(to_numpy(restored.params))):
    assert a.ndim < 2 or not np.array_equal(a, b)
  # Laid out on the new mesh, per the rules, with fsdp and tensor sharding in use.
  axes = set()
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract_222)):
    assert got.sharding.mesh.shape == mesh.shape
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
    axes |= _spec_axes(got.sharding.spec)
  assert {"fsdp", "tensor"} <= axes


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_key_is_named():
  c = base_config()
  with pytest.raises(AttributeError, match="lrr"):
    c.optim.lrr = 1
  with pytest.raises((AttributeError, KeyError), match="lrr"):
    c.optim.update({"lrr": 1})


@pytest.mark.parametrize("key,value,field,shown", [
    ("data.task", "xyz", "data.task", "'xyz'"),
    ("train.batch_size", 0, "train.batch_size", "0"),
    ("train.steps", -1, "train.steps", "-1"),
    ("eval.max_batches", 0, "eval.max_batches", "0"),  # 0 batches would report loss 0.0
    ("optim.accum_steps", 3, "train.batch_size", "accum_steps=3"),  # 8 % 3
    ("optim.lr", 0.0, "optim.lr", "0.0"),
    ("data.target_len", 200, "max_seq_len", "239"),  # 16 image + 239 text tokens > 128
    ("data.tokenizer", "bpe", "data.tokenizer", "'byte', 'shapes'"),
    ("data.tokenizer", "shapes", "model.vocab_size", "vocab_size=304"),  # model has 264
])
def test_validate_names_the_field(shapes_data_dir, key, value, field, shown):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  validate(c)  # the base is valid
  sec, name = key.split(".")
  c[sec][name] = value
  with pytest.raises(ValueError, match=re.escape(field)) as info:
    validate(c)
  assert shown in str(info.value)


def test_vqa_without_vision_on_image_data_is_named(shapes_data_dir):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  c.model = model_section("tiny", max_seq_len=128)
  with pytest.raises(ValueError, match="model.vision"):
    validate(c)


def test_unknown_dataset_is_named(shapes_data_dir, tmp_path):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  c.data.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_batch_not_divisible_by_mesh_is_named(shapes_data_dir, tmp_path):  # noqa: F811
  c = tiny_vlm_config(shapes_data_dir)
  c.train.batch_size = 4  # over 8 data-parallel devices
  with pytest.raises(ValueError, match="batch_size=4"):
    run(c, str(tmp_path / "w"))


def test_wrong_image_shape_is_named(setup):
  bad = dict(setup.batch, image=np.zeros((8, 8, 8, 3), np.uint8))  # model expects 16x16
  mesh = mesh_of((1, 1, 1))
  fn, sh, bsh = setup.step_fn(mesh)
  state = jax.device_put(setup.init_state, sh)
  # Through the jitted train step (raised while tracing, before anything runs) ...
  with pytest.raises(ValueError, match=r"image shape \(8, 8, 8, 3\).*16, 16, 3"):
    fn(state, global_batch(bad, bsh))
  # ... through the jitted eval step, and eagerly through the model.
  with pytest.raises(ValueError, match="image shape"):
    jax.jit(make_eval_step(setup.graphdef, setup.rest))(setup.init_state.params, bad)
  from flax import nnx
  model = nnx.merge(setup.graphdef, setup.init_state.params, setup.rest)
  with pytest.raises(ValueError, match="image shape"):
    model(bad["inputs"], image=bad["image"].astype(np.float32))
  with pytest.raises(ValueError, match="image shape"):  # no batch dimension
    model(bad["inputs"][:1], image=np.zeros((16, 16, 3), np.float32))


def test_token_ids_outside_vocab_are_named(setup):
  from flax import nnx
  model = nnx.merge(setup.graphdef, setup.init_state.params, setup.rest)
  image = np.zeros((1, 16, 16, 3), np.float32)
  for bad in (np.array([[1, 264, 3]], np.int32), np.array([[1, -1, 3]], np.int32)):
    with pytest.raises(ValueError, match="vocab_size=264"):
      model(bad, image=image)


def test_model_vocab_smaller_than_tokenizer_is_rejected(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  """Expected: run() refuses the config while checking it (validate / data set-up), before
  building the train state; a sentinel replaces create_train_state so the failing case
  costs no compilation."""
  c = tiny_vlm_config(shapes_data_dir, vocab_size=100)
  c.data.eval_split = c.data.test_split = ""
  assert ByteTokenizer.vocab_size > 100  # the shapes text uses ids up to 259

  class ReachedStateCreation(Exception):
    pass

  def sentinel(*args, **kwargs):
    raise ReachedStateCreation("run() accepted model.vocab_size=100 < the tokenizer's 260")

  monkeypatch.setattr("gptjax.train.loop.create_train_state", sentinel)
  with pytest.raises(ValueError, match="vocab"):
    run(c, str(tmp_path / "w"))


@pytest.fixture(scope="module")
def corrupt_run(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """A workdir with checkpoints at steps 3 and 6 as run() writes them (train state + data
  iterator position), the newest with truncated array files, and the error run() gives.
  The checkpoints are saved directly, which is all run() reads before failing; training
  for them would only add compile time."""
  c = tiny_vlm_config(shapes_data_dir)  # 6 steps, as the resume test (shares its programs)
  c.checkpoint.every = 3
  c.data.eval_split = c.data.test_split = ""
  w = str(tmp_path_factory.mktemp("corrupt"))
  state, _ = _fresh_state(c)
  pipe = _fresh_pipeline(c)
  with Checkpointer(os.path.join(w, "checkpoints"), save_every=3) as ckpt:
    for step in range(1, 7):
      next(pipe)
      if step % 3 == 0:
        at = state.replace(step=jax.device_put(np.int32(step), state.step.sharding))
        assert ckpt.save(step, at, pipe.iterator)
        ckpt.wait()
  step_dir = os.path.join(w, "checkpoints", "6")
  damaged = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":  # OCDBT data files holding the arrays
      for name in files:
        p = os.path.join(root, name)
        with open(p, "r+b") as f:
          f.truncate(7)
        damaged += 1
  assert damaged > 0, os.listdir(step_dir)
  with pytest.raises(CheckpointCorruptError) as info:
    run(c, w)
  return c, w, step_dir, str(info.value)


# Orbax leaves a read coroutine behind when tensorstore fails ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_in_workdir_is_named(corrupt_run):
  _, w, step_dir, msg = corrupt_run
  assert "step 6" in msg and step_dir in msg, msg
  with Checkpointer(os.path.join(w, "checkpoints"), save_every=1000) as ckpt:
    assert ckpt.all_steps() == [3, 6]  # nothing was deleted or overwritten by the failed run
  assert train_rows(w) == []  # it failed before training


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_hint_can_be_followed(corrupt_run):
  c, w, _, msg = corrupt_run
  hint = re.search(r"--(?:config\.)?([\w.]+)=(\d+)", msg)
  if hint is None:
    return  # no override suggested: nothing to follow
  key, value = hint.group(1), int(hint.group(2))
  node = c
  for part in key.split(".")[:-1]:
    node = node[part]
  setattr(node, key.split(".")[-1], value)  # as --config.<key>=<value> would
  summary = run(c, w)
  assert summary["step"] == 6
  assert [r["step"] for r in train_rows(w)] == [4, 5, 6]


def test_run_text_only_lm(tmp_path):
  text = tmp_path / "corpus.txt"
  para = "the quick brown fox jumps over the lazy dog. " * 8
  text.write_text("\n\n".join(f"{i}: {para}" for i in range(40)))
  c = base_config()
  c.model = model_section("tiny", max_seq_len=64)
  c.data.name, c.data.task, c.data.paths = "text_files", "lm", (str(text),)
  # Documents are whole files unless a separator is named: 40 paragraphs, 40 documents.
  c.data.builder_kwargs = ml_collections.ConfigDict(dict(document_separator="\n\n"))
  c.data.data_dir = str(tmp_path / "data")
  c.data.seq_len = 32
  c.data.test_split = ""
  c.train.steps, c.train.batch_size, c.train.log_every = 2, 8, 1
  c.eval.every, c.eval.batch_size, c.eval.max_batches, c.eval.decode_examples = 0, 8, 1, 0
  c.logging.progress = c.logging.tensorboard = c.logging.plot = False
  summary = run(c, str(tmp_path / "w"))
  assert summary["step"] == 2 and np.isfinite(summary["train_loss"])
  assert np.isfinite(summary["eval"]["loss"])
