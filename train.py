"""Train a gptjax model.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py --config.optim.lr=1e-3 --config.train.steps=200 --workdir runs/x

An existing checkpoint in --workdir is resumed. SIGTERM (a preemptible TPU VM being
reclaimed) saves at the next step boundary and exits 0; rerunning the same command resumes.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gptjax.train.metrics import setup_cli_logging
  setup_cli_logging()
  from gptjax.runs import train  # after flag parsing: keeps --help fast
  summary = train(_CONFIG.value, _WORKDIR.value)
  if summary.get("preempted"):
    sys.exit(0)


if __name__ == "__main__":
  app.run(main)
