"""``gptjax-train``: train a gptjax model (``train.py`` at the repository root runs the same).

  gptjax-train --config demo --workdir runs/demo
  gptjax-train --config demo --config.optim.lr=1e-3 --config.train.steps=200 --workdir runs/x
  gptjax-train --config path/to/my_config.py --workdir runs/mine

``--config`` is a shipped config's name (``demo``, ``distill_mini``, ``lm_text``,
``vlm_teacher``, ``gpt2_small_tpu``) or a path to a file with ``get_config()``. An existing
checkpoint in ``--workdir`` is resumed. SIGTERM (a preemptible TPU VM being reclaimed) saves
at the next step boundary and exits 0; rerunning the same command resumes.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

from gptjax import configs as shipped
from gptjax.cli.configs import resolve_config_arg
from gptjax.runs import train, validate
from gptjax.train.loop import RUN_ERRORS
from gptjax.train.metrics import setup_cli_logging


def _main(config, workdir, argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_cli_logging()
  try:
    validate(config.value)  # a bad value or a missing extra: one line, before any training
  except ValueError as e:
    sys.exit(f"gptjax-train: {e}")
  try:
    summary = train(config.value, workdir.value)
  except RUN_ERRORS as e:  # the message says how to recover: no traceback
    print(f"{os.path.basename(argv[0])}: error: {type(e).__name__}: {e}", file=sys.stderr,
          flush=True)
    sys.exit(1)
  if summary.get("preempted"):
    sys.exit(0)


def run(argv: Optional[Sequence[str]] = None) -> None:
  """The console script: parse ``argv`` (default ``sys.argv``) and train."""
  argv = resolve_config_arg(list(sys.argv if argv is None else argv), shipped.TRAIN)
  # Flags are defined here rather than at import, so importing this module defines none.
  config = config_flags.DEFINE_config_file(
      "config", None, f"a shipped config ({', '.join(shipped.TRAIN)}) or a config file path",
      lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, plots.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(functools.partial(_main, config, workdir), argv=argv)
