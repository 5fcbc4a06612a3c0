"""Test-session setup. Runs before any test module (and so before jax) is imported.

* 8 fake CPU devices, so sharding tests can build real meshes in-process.
* CPU by default, so results do not depend on whichever accelerator happens to be present.
* A non-interactive matplotlib backend for tests that plot.
* One persistent XLA compilation cache for the whole session: both xdist workers and every
  subprocess a test starts (train.py runs) inherit it through the environment, so the many
  identical tiny programs (the same tiny VLM's train step in a dozen tests) compile once.
  Measured on the 2-core CI machine: the suite's wall time drops by minutes. Entries are
  written under jax's file lock (enabled by a cache size limit), so concurrent processes
  never read a half-written entry; the directory is removed when the session ends.

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

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller: workers inherit it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptjax-tests-xla-")
  os.environ["GPTJAX_TESTS_OWN_XLA_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))  # turns on the lock


def pytest_unconfigure(config):
  if os.environ.get("GPTJAX_TESTS_OWN_XLA_CACHE") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Run the long end-to-end tests (``slow``) first. Under xdist's load scheduling a long
  test that starts last runs alone at the end while the other worker idles; started first,
  the short tests fill in around it. The sort is stable: the rest keep their order."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
