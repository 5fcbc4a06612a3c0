"""Test-session setup. Runs before any test module (and so before jax) is imported.

* 8 fake CPU devices, so sharding tests can build real meshes in-process.
* CPU by default, so results do not depend on whichever accelerator happens to be present.
* A non-interactive matplotlib backend for tests that plot.
* No session-wide persistent XLA compilation cache: measured, it cost more than it saved
  (an eager-heavy test 29.8 -> 35.7 s CPU: every tiny eager op's compile is hashed and
  looked up on disk; a train-heavy one 47.3 -> 45.4 s). The few tests that compile the same
  programs in subprocesses use ``_train_helpers.persistent_compile_cache`` instead.

jax keeps its default float32; NumPy references are computed in float64.
"""
import os
import shutil
import tempfile

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " " + _DEVICE_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # override (e.g. =cuda) to run on an accelerator
os.environ.setdefault("MPLBACKEND", "Agg")
# Measured matmul peaks (for MFU) kept for this session only, shared with the subprocesses
# it starts (each would otherwise probe for ~1-2 s), never in the user's ~/.cache.
_OWN_CACHE = None
if "GPTJAX_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["GPTJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptjax-test-cache-")


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Run the long end-to-end tests (``slow``) first. Under xdist's load scheduling a long
  test that starts last runs alone at the end while the other worker idles; started first,
  the short tests fill in around it. The sort is stable: the rest keep their order."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
