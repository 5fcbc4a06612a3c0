"""One run per workdir, and a writable workdir, checked before any training starts.

``acquire(workdir)`` creates ``<workdir>/.gptjax.lock`` atomically (``O_CREAT | O_EXCL``:
of two processes racing, exactly one creates it) holding JSON ``{host, pid, started,
command}``. A second run on the same workdir gets ``WorkdirLockedError`` naming the holder;
a lock left by a dead process on this host (killed, OOM, power loss of a local job) is taken
over with a warning. ``WorkdirLock.release`` removes it (``run`` does so in ``finally``).

Multi-host jobs: only process 0 takes the lock -- all processes of one job share the
workdir legitimately, and a second *job* is refused by process 0 of that job. Remote
workdirs (``gs://...``) are not locked: object stores have no atomic create-exclusive here.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

import jax

log = logging.getLogger("gptjax")

LOCK_FILE = ".gptjax.lock"
# A lock file that is still empty / unparsable this long after it was created was left by a
# process that died between creating and writing it; a younger one is being written now.
_UNREADABLE_STALE_S = 30.0


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""

  def __init__(self, message: str, *, path: str, holder: dict):
    super().__init__(message)
    self.path, self.holder = path, holder


class WorkdirNotWritableError(OSError):
  """The workdir (or its checkpoints directory) cannot be written."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def not_writable(path: str, e: OSError) -> WorkdirNotWritableError:
  name = errno.errorcode.get(e.errno, "?") if e.errno is not None else "?"
  return WorkdirNotWritableError(
      e.errno, f"workdir path {path} is not writable ({type(e).__name__}: [errno {e.errno} "
      f"{name}] {e.strerror or e}); nothing was trained. Fix its permissions / free space, or "
      "pass another --workdir.")


def check_writable(directory: str) -> None:
  """Create ``directory`` and a probe file in it, or raise ``WorkdirNotWritableError``
  naming the path and errno (before any training, not at the first save)."""
  probe = os.path.join(directory, f".gptjax-write-probe.{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
      os.write(fd, b"ok")
    finally:
      os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise not_writable(directory, e) from e


class WorkdirLock:
  """A held lock (``path`` None: not locked, e.g. a remote workdir or process > 0)."""

  def __init__(self, path: Optional[str], info: Optional[dict] = None):
    self.path, self.info = path, info

  def release(self) -> None:
    if self.path is None:
      return
    path, self.path = self.path, None
    try:
      with open(path) as f:
        held = json.load(f)
    except (OSError, ValueError):
      return
    # Only our own lock (a stale-lock takeover by another run must not be undone).
    if held.get("pid") == self.info["pid"] and held.get("host") == self.info["host"]:
      try:
        os.unlink(path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _holder(path: str) -> Optional[dict]:
  """The lock's JSON, {} if unreadable (being written, or a writer died), None if gone."""
  try:
    with open(path) as f:
      return json.loads(f.read() or "null") or {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _stale(path: str, holder: dict) -> bool:
  if not holder:
    try:
      return time.time() - os.path.getmtime(path) > _UNREADABLE_STALE_S
    except FileNotFoundError:
      return True
  return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))


def acquire(workdir: str) -> WorkdirLock:
  """Take ``<workdir>/.gptjax.lock`` (see the module docstring)."""
  if "://" in workdir:
    log.info("workdir %s is remote: not locked (one run per workdir is up to you)", workdir)
    return WorkdirLock(None)
  if jax.process_index() != 0:  # the job's process 0 holds it for all of them
    return WorkdirLock(None)
  path = os.path.join(workdir, LOCK_FILE)
  info = dict(host=socket.gethostname(), pid=os.getpid(),
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join(sys.argv))
  for _ in range(3):  # a takeover can race with another process's; retry a few times
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if holder is None:
        continue  # released meanwhile
      if not _stale(path, holder):
        raise _locked(path, holder)
      # Move the stale file aside under a unique name (atomic), then check we moved the
      # stale one and not a fresh lock another process created after our read.
      aside = f"{path}.stale.{os.getpid()}"
      try:
        os.rename(path, aside)
      except FileNotFoundError:
        continue
      moved = _holder(aside)
      if moved != holder:  # someone else's fresh lock: put it back (link fails if taken)
        try:
          os.link(aside, path)
        except FileExistsError:
          pass
        os.unlink(aside)
        continue
      os.unlink(aside)
      log.warning("took over the stale lock %s of %s (that process is gone)", path,
                  _describe(holder) if holder else "a process that died while creating it")
      continue
    except OSError as e:
      raise not_writable(workdir, e) from e
    with os.fdopen(fd, "w") as f:
      json.dump(info, f)
    return WorkdirLock(path, info)
  holder = _holder(path) or {}
  raise _locked(path, holder)


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since "
          f"{holder.get('started', '?')}, command: {holder.get('command', '?')})")


def _locked(path: str, holder: dict) -> WorkdirLockedError:
  who = _describe(holder) if holder else "a process that is creating it right now"
  same_host = holder.get("host") == socket.gethostname()
  gone = ("if that process is gone" if same_host else
          f"if that process on {holder.get('host', '?')} is gone (this host cannot check)")
  return WorkdirLockedError(
      f"workdir {os.path.dirname(path)} is in use by another run: {who}. Two runs on one "
      f"workdir would overwrite each other's checkpoints. Wait for it to finish (or stop "
      f"it), or pass another --workdir; {gone}, remove the lock and rerun: rm {path}",
      path=path, holder=holder)
