"""Preemption: SIGTERM (a preemptible TPU VM being reclaimed) and SIGINT become a "save a
checkpoint and stop at the next step boundary" decision that every host agrees on."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)


class PreemptionWatcher:
  """Turns SIGTERM (and optionally SIGINT) into a stop decision all hosts agree on.

  Call ``should_stop(step)`` once per training step, on every host, with the same step
  numbers; when it returns True, save a checkpoint (``force=True``) and exit.

  * Single process: a signal handler sets a flag; ``should_stop`` returns it.
  * Multi-process with JAX's preemption service (``jax.distributed.initialize``, the default):
    JAX's runtime owns SIGTERM and propagates the notice to all hosts, and
    ``multihost_utils.reached_preemption_sync_point(step)`` returns True on all of them at the
    same step. We do not install a Python SIGTERM handler then (it would replace JAX's).
  * Multi-process without it (or for SIGINT): the local flag is combined across hosts with
    ``multihost_utils.process_allgather`` every ``sync_every`` steps.

  A second SIGINT while a stop is already pending raises ``KeyboardInterrupt`` (hard stop).
  Previous handlers are restored on ``close()`` / context exit.
  """

  def __init__(self, *, handle_sigint: bool = True, sync_every: int = 1, install: bool = True):
    self.sync_every = max(1, int(sync_every))
    self._flag = threading.Event()
    self.received: Optional[int] = None  # the signal number that set the flag
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._jax_sync = self._multi and self._jax_preemption_service_available()
    self._signals: list[int] = []
    if not self._jax_sync:
      self._signals.append(signal.SIGTERM)
    if handle_sigint:
      self._signals.append(signal.SIGINT)
    if install:
      self.install()

  @staticmethod
  def _jax_preemption_service_available() -> bool:
    # jax.distributed.initialize starts the preemption service unless the
    # jax_enable_preemption_service flag is off (both public; jax >= 0.4.31).
    return bool(jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service)

  def install(self) -> None:
    if self._previous:
      return
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionWatcher: not on the main thread; signal handlers not installed")
      return
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    if signum == signal.SIGINT and self._flag.is_set():
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self.received = signum
    self._flag.set()
    log.warning("received %s: will save a checkpoint and stop at the next step boundary",
                signal.Signals(signum).name)

  def request_stop(self) -> None:
    """Set the stop flag programmatically (as if a signal had arrived on this host)."""
    self._flag.set()

  @property
  def stop_requested(self) -> bool:
    """This host's local flag (not synchronized across hosts)."""
    return self._flag.is_set()

  def should_stop(self, step: Optional[int] = None) -> bool:
    """True when training should save and stop at ``step``; same answer on every host."""
    if not self._multi:
      return self._flag.is_set()
    if step is None:
      raise ValueError("PreemptionWatcher.should_stop(step): step is required on multi-host")
    from jax.experimental import multihost_utils
    stop = False
    if self._jax_sync:
      stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
    if self._signals and int(step) % self.sync_every == 0:
      flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set(), np.int32))
      stop = stop or bool(np.any(flags))
    return stop

  def close(self) -> None:
    """Restore the signal handlers that were installed before."""
    if not self._previous:
      return
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionWatcher.close: not on the main thread; handlers left installed")
      return
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous = {}

  def __enter__(self) -> "PreemptionWatcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
