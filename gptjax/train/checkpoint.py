"""Checkpointing for training runs: a thin, careful layer over ``orbax.checkpoint``.

``Checkpointer`` saves the train state (any pytree of ``jax.Array``s, possibly sharded over a
mesh) and, optionally, the grain data-iterator state *together*, in one Orbax step::

    <directory>/<step>/state/   # ocp.StandardCheckpointHandler (OCDBT/zarr), one per step
    <directory>/<step>/data/    # grain iterator state, process_<i>-of-<n>.json

What Orbax guarantees and we rely on:

* Atomicity. A step is written under ``<step>.orbax-checkpoint-tmp`` (orbax 0.12: no
  timestamp suffix; the items inside are ``state.orbax-checkpoint-tmp`` etc.) and renamed to
  ``<step>`` only once every host has finished. An interrupted save therefore leaves only a
  ``*.orbax-checkpoint-tmp`` directory, which is never listed as a step; it is deleted the next
  time a ``Checkpointer`` opens the directory (``cleanup_tmp_directories=True``).
* Multi-host coordination. Every method here must be called on *all* processes; Orbax does
  the barriers and decides which process writes which file. Nothing in this module writes
  files itself.
* Resharding. ``restore`` takes an abstract tree whose ``jax.ShapeDtypeStruct`` leaves carry
  the *target* shardings, which may come from a different mesh than at save time.

RNG keys must be stored as raw ``uint32`` key data (``jax.random.key_data``); typed key arrays
are rejected with a clear error.

Preemption (SIGTERM -> save and stop) is ``gptjax.train.preemption``.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from gptjax.tree import flat_dict

log = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data"
# What orbax 0.12 appends to a step (and item) directory while it is being written.
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"

__all__ = [
    "Checkpointer", "abstract_like", "CheckpointCorruptError", "CheckpointSaveError",
    "CheckpointMismatchError", "TMP_DIR_SUFFIX", "step_override",
]


def step_override(step: int, prefix: str = "") -> str:
  """The command-line override that resumes from ``step``. Library code does not know which
  CLI called it, so it names the key in the config-override form ``train.py`` accepts;
  a CLI whose training config sits deeper (the recipe's ``config.teacher``) re-prefixes it
  with ``CheckpointCorruptError.with_prefix``."""
  return f"--config.{prefix + '.' if prefix else ''}checkpoint.step={int(step)}"


class CheckpointCorruptError(RuntimeError):
  """A finalized checkpoint step that cannot be read (files missing / truncated).

  ``step``: the unreadable step; ``path``: its directory; ``fallback``: the newest other
  step (None if there is none), which ``step_override(fallback)`` resumes from.
  """

  def __init__(self, step: int, path: str, cause: str, others: list[int], *,
               prefix: Optional[str] = ""):
    self.step, self.path, self.cause, self.others = step, path, cause, list(others)
    self.fallback = others[-1] if others else None
    self.prefix = prefix
    if prefix is None:  # this CLI has no single override for it: only the delete hint
      hint = ""
    elif self.fallback is not None:
      hint = (f"resume from an older step: rerun the same command with "
              f"{step_override(self.fallback, prefix)} appended (available: {others}), or ")
    else:
      hint = "there is no other checkpoint step to fall back to; "
    super().__init__(
        f"checkpoint step {step} at {path} could not be read -- it is corrupt or incomplete "
        f"({cause}). Either {hint}delete it (rm -r {path}) and rerun.")

  def with_prefix(self, prefix: Optional[str]) -> "CheckpointCorruptError":
    """The same error, its hint naming the key under config section ``prefix`` (e.g.
    ``--config.teacher.checkpoint.step=N`` for a recipe stage; None: no override hint)."""
    return CheckpointCorruptError(self.step, self.path, self.cause, self.others, prefix=prefix)


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, no permission, ...). Older steps are
  untouched (a save is atomic: the step directory appears only once complete)."""

  def __init__(self, step: Optional[int], path: str, error: BaseException):
    self.step, self.path, self.error = step, path, error
    what = f"step {step}" if step is not None else "a step"
    hint = ""
    if isinstance(error, OSError) and error.errno is not None:
      hint = f" [errno {error.errno} {errno.errorcode.get(error.errno, '?')}]"
    super().__init__(
        f"saving checkpoint {what} to {path} failed: {type(error).__name__}: "
        f"{_first_line(error)}{hint}. Older checkpoints in {os.path.dirname(path)} are "
        "intact; free space / fix permissions there, then rerun the same command (it "
        "resumes from the newest complete step).")


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree structure or array shapes do not match the restore target."""


# ----------------------------------------------------------------------------- helpers


def _first_line(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  for noise in (" See full TensorStore details", " [tensorstore_spec"):  # huge JSON specs
    first = first.split(noise)[0]
  return first[:300]


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _reject_typed_keys(tree, what: str) -> None:
  bad = [name for name, x in flat_dict(tree).items() if _is_typed_key(x)]
  if bad:
    raise TypeError(
        f"{what} contains typed PRNG key arrays at {bad[:5]}; store raw key data instead "
        "(jax.random.key_data(key), uint32) and wrap it back with jax.random.wrap_key_data.")


def abstract_like(state, shardings=None):
  """``state`` with every array leaf replaced by ``jax.ShapeDtypeStruct(shape, dtype, sharding)``.

  ``shardings``: a tree with the structure of ``state`` (or a prefix of it) whose leaves are
  ``jax.sharding.Sharding``s -- e.g. ``gptjax.sharding.state_shardings(state, mesh)`` -- or a
  single ``Sharding`` for every leaf, or ``None`` to keep each array's current sharding.
  ``state`` may itself be abstract (e.g. from ``jax.eval_shape`` / ``nnx.eval_shape``).
  Non-array leaves (Python scalars) are kept as they are.
  """
  from jax.sharding import Sharding

  def one(x, sharding):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      return x
    if sharding is None:
      sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, Sharding):
    return jax.tree.map(lambda x: one(x, shardings), state)
  is_sharding = lambda s: isinstance(s, Sharding) or s is None
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub),
                      shardings, state, is_leaf=is_sharding)


# ----------------------------------------------------------------------------- Checkpointer

# Orbax splits the saving of every replicated array across its replicas: one small slice
# program per array shape *and device*, each compiled on first use (a tiny VLM's first save
# on 8 CPU devices: ~200 compiles, 34 s). Below 4 MiB per replica slice one replica writes
# it (same files; orbax already skips the split on GPU). Old orbax without the option: as is.
@functools.cache
def _register_array_handler() -> None:
  with contextlib.suppress(TypeError):
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=4 << 20,  # keep orbax's default metadata store:
        array_metadata_store=getattr(  # a private attribute (None if it is renamed)
            ocp.type_handlers.get_type_handler(jax.Array), "_array_metadata_store", None)),
        override=True)


class Checkpointer:
  """Periodic, async, keep-last-K checkpoints of (train state, data iterator).

  All methods must be called on every process of a multi-host job, in the same order.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: Optional[int] = 3,
               async_save: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f"checkpoint keep={keep} must be >= 1 (or None to keep all)")
    _register_array_handler()
    directory = os.fspath(directory)
    if "://" not in directory:  # local / mounted path: Orbax wants it absolute
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self.save_every = int(save_every)
    self.keep = keep
    self.async_save = async_save
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        # Leftovers of an interrupted save (<step>.orbax-checkpoint-tmp) are removed on open.
        cleanup_tmp_directories=True,
    )
    self._mgr = ocp.CheckpointManager(
        self.directory,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_ITEM: grain.checkpoint.CheckpointHandler()},
        options=options,
    )
    self._in_flight: Optional[int] = None  # step of the async save not yet known finalized
    self._failed = False  # a save error was raised already (close() does not raise it again)
    self._closed = False

  # -- queries

  def _refresh_in_flight(self) -> None:
    if self._in_flight is not None and not self._mgr.is_saving_in_progress():
      self._in_flight = None

  def all_steps(self) -> list[int]:
    """Finalized steps, ascending (an async save still being written is not included)."""
    self._refresh_in_flight()
    return sorted(s for s in self._mgr.all_steps() if s != self._in_flight)

  def latest_step(self) -> Optional[int]:
    """Newest finalized step, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is a periodic save step (``step % save_every == 0``)."""
    return self.save_every > 0 and step % self.save_every == 0

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  # -- save

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Start saving ``state`` (+ the iterator's position) as ``step``; True if a save started.

    Only on ``should_save(step)`` steps unless ``force`` (final step, preemption). A step that
    already exists is never overwritten (returns False). With ``async_save`` the arrays are
    copied off-device before this returns and written in the background; the data-iterator
    state is captured synchronously, so advancing the iterator afterwards is safe.
    """
    self._check_open()
    step = int(step)
    if not force and not self.should_save(step):
      return False
    if step in self._mgr.all_steps():
      log.info("checkpoint step %d already exists in %s; not saving again", step, self.directory)
      return False
    _reject_typed_keys(state, "checkpoint state")
    # A previous async save's error surfaces here at the latest (orbax re-raises it at the
    # next save or wait): name that step, not this one.
    self.wait()
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      started = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      return False
    except Exception as e:  # noqa: BLE001 -- OSError (ENOSPC, EACCES), tensorstore errors
      self._failed = True
      raise CheckpointSaveError(step, os.fspath(self.step_dir(step)), e) from e
    if started:
      self._in_flight = step if self.async_save else None
      log.info("checkpoint step %d %s to %s", step,
               "being written" if self.async_save else "written", self.directory)
    return bool(started)

  def wait(self) -> None:
    """Block until any async save has been finalized (renamed into place); a failed
    background write raises ``CheckpointSaveError`` here."""
    step, self._in_flight = self._in_flight, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- the background write's error, with context
      self._failed = True
      path = os.fspath(self.step_dir(step) if step is not None else self.directory)
      raise CheckpointSaveError(step, path, e) from e

  # -- restore

  def restore(self, abstract_state, data_iterator=None, *, step: Optional[int] = None):
    """Restore ``step`` (default: the latest finalized one) into the shape of ``abstract_state``.

    ``abstract_state``: the state pytree with ``jax.ShapeDtypeStruct`` leaves carrying the target
    shardings (see ``abstract_like``); concrete arrays are accepted and their shardings used.
    ``data_iterator``: if given, its position is restored in place.
    Raises ``FileNotFoundError`` (no such step), ``CheckpointMismatchError`` (tree/shapes differ
    from the model) or ``CheckpointCorruptError`` (unreadable step directory).
    """
    self._check_open()
    self.wait()  # never read a step that is still being written
    available = self.all_steps()
    if step is None:
      if not available:
        raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
      step = available[-1]
    step = int(step)
    if step not in available:
      raise FileNotFoundError(
          f"checkpoint step {step} not found in {self.directory}; available: {available or 'none'}")
    _reject_typed_keys(abstract_state, "restore target")
    abstract_state = abstract_like(abstract_state)  # concrete leaves -> ShapeDtypeStruct
    self._check_matches(step, abstract_state, available)
    if data_iterator is not None and not (self.step_dir(step) / DATA_ITEM).exists():
      raise CheckpointMismatchError(
          f"checkpoint {self.step_dir(step)} (step {step}) has no data-iterator state; it was "
          "saved without one. Restore without a data iterator (the data pipeline restarts).")

    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- re-raised with context
      raise self._corrupt(step, available, e) from e
    log.info("restored checkpoint step %d from %s", step, self.directory)
    return restored[STATE_ITEM]

  def set_aside(self, steps: list[int], reason: str) -> list[str]:
    """Rename finalized ``steps`` to ``<step>.<reason>`` (kept on disk, no longer steps):
    after resuming from an older step, the newer ones would otherwise block saving those
    step numbers again (a step is never overwritten) and be resumed from next time.
    Process 0 renames; every process must call this."""
    self._check_open()
    self.wait()
    moved = []
    for step in steps:
      src = self.step_dir(step)
      dst = src.parent / f"{src.name}.{reason}"
      if jax.process_index() == 0 and src.exists():
        src.rename(dst)
      moved.append(os.fspath(dst))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("gptjax_checkpoint_set_aside")
    self._mgr.reload()
    for dst in moved:
      log.warning("checkpoint moved aside (not resumed from again): %s", dst)
    return moved

  def _corrupt(self, step: int, available: list[int], e: BaseException) -> CheckpointCorruptError:
    others = [s for s in available if s < step] or [s for s in available if s != step]
    return CheckpointCorruptError(step, os.fspath(self.step_dir(step)),
                                  f"{type(e).__name__}: {_first_line(e)}", others)

  def _check_matches(self, step: int, abstract_state, available: list[int]) -> None:
    """Compare the on-disk tree metadata with the target before reading any array."""
    try:
      metadata = self._mgr.item_metadata(step)
      metadata = metadata[STATE_ITEM] if metadata is not None else None
      tree = getattr(metadata, "tree", metadata)
      if tree is None:
        raise FileNotFoundError(f"no '{STATE_ITEM}' item metadata")
      saved = flat_dict(tree)
    except Exception as e:  # noqa: BLE001 -- re-raised with context
      raise self._corrupt(step, available, e) from e
    wanted = flat_dict(abstract_state)
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(wanted[k].shape)}"
              for k in sorted(set(saved) & set(wanted))
              if hasattr(wanted[k], "shape") and getattr(saved[k], "shape", None) is not None
              and tuple(saved[k].shape) != tuple(wanted[k].shape)]
    if missing or unexpected or shapes:
      parts = []
      if shapes:
        parts.append(f"shape mismatch for {len(shapes)} array(s): " + "; ".join(shapes[:10]))
      if missing:
        parts.append(f"{len(missing)} array(s) in the model but not in the checkpoint: "
                     f"{missing[:10]}")
      if unexpected:
        parts.append(f"{len(unexpected)} array(s) in the checkpoint but not in the model: "
                     f"{unexpected[:10]}")
      raise CheckpointMismatchError(
          f"checkpoint step {step} at {self.step_dir(step)} does not match the model/optimizer "
          "being restored (was it saved with a different config?): " + " | ".join(parts))
    for k in sorted(set(saved) & set(wanted)):
      sd, wd = getattr(saved[k], "dtype", None), getattr(wanted[k], "dtype", None)
      if sd is not None and wd is not None and np.dtype(sd) != np.dtype(wd):
        log.warning("checkpoint step %d: %s stored as %s, restored as %s", step, k, sd, wd)

  # -- lifecycle

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"Checkpointer({self.directory}) is closed")

  def close(self) -> None:
    """Wait for pending saves, then release Orbax's resources. Idempotent."""
    if self._closed:
      return
    try:
      if self._failed:  # already raised once; do not mask what is propagating
        try:
          self.wait()
        except CheckpointSaveError as e:
          log.warning("%s", e)
      else:
        self.wait()
    finally:
      self._mgr.close()
      self._closed = True

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (f"Checkpointer({str(self.directory)!r}, save_every={self.save_every}, "
            f"keep={self.keep}, async_save={self.async_save})")
