"""notebooks/quickstart.ipynb runs top to bottom (with GPTJAX_QUICK=1: a few steps) in a
fresh kernel from this venv, and its last cell prints the size/quality table.

Jupyter and IPython state, the run's workdir and its data go to temporary directories, so
nothing is written to $HOME.
"""
import os
import sys

from _train_helpers import REPO_ROOT, compile_cache_dir  # noqa: F401

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "quickstart.ipynb")


def _kernel_spec(tmp_path) -> str:
  """A kernelspec that starts this interpreter (the venv's), in a private Jupyter data dir."""
  import json
  spec = tmp_path / "jupyter_data" / "kernels" / "gptjax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "gptjax test", "language": "python"}))
  return "gptjax-test"


def test_quickstart_notebook_runs(tmp_path, monkeypatch, compile_cache_dir):  # noqa: F811
  # The [test] extra's; imported, not skipped: a missing one must fail the suite.
  import ipykernel  # noqa: F401
  import nbclient
  import nbformat
  for var, sub in (("IPYTHONDIR", "ipython"), ("JUPYTER_CONFIG_DIR", "jupyter_config"),
                   ("JUPYTER_DATA_DIR", "jupyter_data"), ("JUPYTER_RUNTIME_DIR", "jupyter_rt"),
                   ("MPLCONFIGDIR", "mpl")):
    monkeypatch.setenv(var, str(tmp_path / sub))
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  monkeypatch.setenv("GPTJAX_QUICK", "1")
  (tmp_path / "tmp").mkdir()
  monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the notebook's workdir and data
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as a laptop user has
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compile_cache_dir)
  monkeypatch.setenv("TQDM_DISABLE", "1")
  # The test session's Agg (conftest) would hide the inline figures this test looks for.
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.setenv("PYTHONPATH", REPO_ROOT)
  kernel = _kernel_spec(tmp_path)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
      "commit the notebook with its outputs cleared"
  client = nbclient.NotebookClient(nb, timeout=180, kernel_name=kernel,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError (with the cell and traceback) on any error

  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == "error"]
  assert not errors, errors
  images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) >= 2, "the loss plot and the sample images were not shown inline"
  last = [c for c in nb.cells if c.cell_type == "code"][-1]
  text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
  assert "bytes on disk" in text and "float32" in text and "int8" in text, text
  assert "smaller on disk" in text, text
