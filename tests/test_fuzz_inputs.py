"""Fuzzed inputs (hypothesis, bounded): configs with random overrides (wrong types, out of
range values, unknown keys) and random batches (shapes, dtypes, ids out of range, NaN
pixels). Each either works or fails with ValueError / TypeError / AttributeError / KeyError
naming what is wrong -- never a bare comparison TypeError or an XLA shape error."""
import copy
import re

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _train_helpers import (compile_cache_dir, persistent_compile_cache,  # noqa: F401
                            shapes_data_dir, tiny_vlm_config)
from gptjax.batch import MODEL_KEYS, check_batch, forward
from gptjax.model import from_config
from gptjax.runs import validate
from gptjax.train.config import model_config

@pytest.fixture(scope="module", autouse=True)
def _compile_cache(compile_cache_dir):  # noqa: F811
  with persistent_compile_cache(compile_cache_dir):
    yield


FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# ----------------------------------------------------------------------------- configs

BASE = tiny_vlm_config("/nonexistent-data-dir")  # valid; validate() reads no data


def _leaves(d, prefix=""):
  for k, v in d.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield prefix + k


KEYS = sorted(_leaves(BASE)) + ["optim.lrr", "train.stepz", "nosuch.key", "model.vision.nope"]
VALUES = st.one_of(
    st.integers(-10**12, 10**12), st.sampled_from([0, -1, 1, 2, 3, 7, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -0.5, 0.0, 0.5, 1e30]),
    st.text(max_size=6), st.sampled_from(["", "xyz", "skip", "lm", "vqa", "none", "vit"]),
    st.none(), st.booleans(), st.tuples(st.integers(-2, 9)))


def _names(msg: str, key: str) -> bool:
  """The message names ``key``: its dotted path, or its name in a ``section`` the message
  mentions (e.g. ``'steps'`` in ml_collections' "Could not override field 'steps'")."""
  *path, leaf = key.split(".")
  return key in msg or (re.search(rf"\b{re.escape(leaf)}\b", msg) is not None and (
      not path or any(p in msg for p in path) or "override" in msg or "field" in msg))


def test_config_fuzzer_detects_an_unnamed_error():
  assert not _names("'>' not supported between instances of 'NoneType' and 'int'", "optim.lr")
  assert _names("config.optim.lr=None is invalid: must be a finite number", "optim.lr")


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_config_overrides_pass_or_name_the_field(overrides):
  c = copy.deepcopy(BASE)
  applied = []
  for key, value in overrides:
    *path, leaf = key.split(".")
    try:
      node = c
      for p in path:
        node = node[p]
      node[leaf] = value  # as --config.<key>=<value> (or cfg.<key> = value) would
    except (TypeError, AttributeError, KeyError, ValueError) as e:
      # A missing section fails at the section (ml_collections names it, not the leaf).
      missing = next((p for p in path if isinstance(e, KeyError) and repr(p) in str(e)), None)
      assert _names(str(e), key) or missing is not None, (key, value, repr(e))
      continue
    applied.append(key)
  try:
    validate(c)
  except (ValueError, TypeError) as e:
    # Overrides interact (a larger target_len is reported as too small a max_seq_len):
    # the error names one of the overridden fields, or the config key it depends on.
    assert any(_names(str(e), k) for k in applied), (
        overrides, repr(e))


# ----------------------------------------------------------------------------- batches

MCFG = model_config(BASE)  # tiny VLM: 16x16x3 images, vocab 264, max_seq_len 112


@pytest.fixture(scope="module")
def model():
  return from_config(MCFG, 0)


DTYPES = [np.int32, np.int64, np.uint8, np.float32, np.float64, np.bool_]


@st.composite
def batches(draw):
  b = draw(st.integers(1, 3))
  t = draw(st.sampled_from([1, 5, 17, MCFG.max_seq_len, MCFG.max_seq_len + 3]))
  ids = lambda shape: draw(st.sampled_from([  # noqa: E731
      np.int32, np.int32, np.int32, np.int64, np.float32]))
  batch = {}
  shape = draw(st.sampled_from([(b, t), (b, t), (b, t), (t,), (b, t, 2)]))
  lo, hi = draw(st.sampled_from([(0, MCFG.vocab_size), (0, MCFG.vocab_size),
                                 (-3, 4), (MCFG.vocab_size - 2, MCFG.vocab_size + 2)]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  batch["inputs"] = rng.integers(lo, hi, shape).astype(ids(shape))
  if draw(st.booleans()):
    side = draw(st.sampled_from([16, 16, 16, 8]))
    ishape = draw(st.sampled_from([(b, side, side, 3), (b, side, side, 3), (b + 1, 16, 16, 3),
                                   (b, 16, 16, 1), (16, 16, 3)]))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.float32, np.int32, np.bool_]))
    image = rng.integers(0, 256, ishape).astype(dtype)
    if dtype == np.float32:
      image = image / 255.0
      if draw(st.booleans()):
        image.flat[0] = np.nan  # NaN pixels: the step's guard skips, the model just runs
    batch["image"] = image
  for key in ("segment_ids", "positions"):
    if draw(st.integers(0, 3)) == 0:
      kshape = draw(st.sampled_from([(b, t), (b, t), (b, t + 1)]))
      batch[key] = rng.integers(0 if key == "positions" else 1, 3, kshape).astype(
          draw(st.sampled_from([np.int32, np.int32, np.float32])))
  return batch


def _named_batch_error(e: BaseException, batch: dict) -> bool:
  msg = str(e)
  return any(f"'{k}'" in msg for k in list(batch) + list(MODEL_KEYS))


# Fewer examples than the other fuzzers: each new batch shape is a forward compilation
# (~0.8 s); 25 still cover every shape / dtype / range choice of `batches` several times.
@settings(FUZZ, max_examples=25)
@given(batches())
def test_forward_runs_or_names_the_key(model, batch):
  try:
    logits = forward(model, batch)
  except (ValueError, TypeError) as e:
    assert _named_batch_error(e, batch), (
        {k: (v.shape, v.dtype) for k, v in batch.items()}, repr(e))
    return
  b, t = batch["inputs"].shape
  assert logits.shape == (b, t, MCFG.vocab_size)
  # A batch the model ran on must also pass the check the training loop makes.
  check_batch(batch, MCFG)


@FUZZ
@given(batches(), st.sampled_from(["ok", "short", "float_targets", "big_targets", "mask_3d"]))
def test_train_batch_check_names_the_key(batch, extra):
  """What the loop checks on the first batch (the train step compiles for exactly that
  layout): targets / loss_mask too."""
  shape = np.shape(batch["inputs"])
  rng = np.random.default_rng(0)
  targets = rng.integers(0, MCFG.vocab_size, shape).astype(np.int32)
  mask = np.ones(shape, np.float32)
  if extra == "short" and len(shape) == 2:
    targets = targets[:, :-1] if shape[1] > 1 else targets[:, :0]
  elif extra == "float_targets":
    targets = targets.astype(np.float32)
  elif extra == "big_targets":
    targets = targets + MCFG.vocab_size
  elif extra == "mask_3d":
    mask = mask[..., None]
  batch = dict(batch, targets=targets, loss_mask=mask)
  try:
    check_batch(batch, MCFG)
  except (ValueError, TypeError) as e:
    assert _named_batch_error(e, batch), repr(e)
    return
  assert extra == "ok" or (extra == "short" and len(shape) != 2), extra
  assert np.ndim(batch["inputs"]) == 2


def test_loop_checks_the_first_batch(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  """A stream whose batches do not fit the model fails naming the key before the train step
  is compiled (not as an XLA shape error)."""
  import gptjax.train.loop as loop
  original = loop.pipeline_for

  class Truncated:
    def __init__(self, pipe):
      self.pipe, self.iterator, self.num_examples = pipe, pipe.iterator, pipe.num_examples

    def __next__(self):
      b = dict(next(self.pipe))
      b["image"] = b["image"][:, :8]  # 8x16 images for a 16x16 model
      return b

  monkeypatch.setattr(loop, "pipeline_for", lambda *a, **k: Truncated(original(*a, **k)))
  monkeypatch.setattr(loop, "jit_train_step", lambda *a, **k: pytest.fail("compiled"))
  c = tiny_vlm_config(shapes_data_dir)
  c.data.eval_split = c.data.test_split = ""
  with pytest.raises(ValueError, match=r"batch\['image'\].*\(8, 8, 16, 3\).*16, 16, 3"):
    loop.run(c, str(tmp_path / "w"))
  assert jax.device_count() == 8
