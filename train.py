"""Train a gptjax model: the same command as the installed ``gptjax-train``.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config demo --config.optim.lr=1e-3 --config.train.steps=200 --workdir runs/x

``--config`` is a config file or a shipped config's name. An existing checkpoint in
--workdir is resumed. SIGTERM (a preemptible TPU VM being reclaimed) saves at the next step
boundary and exits 0; rerunning the same command resumes. A failure with a known recovery
(diverged loss, corrupt or unwritable checkpoints, a workdir in use by another run) prints
one message saying what to run, no traceback, and exits 1.
"""
from gptjax.cli.train import run

if __name__ == "__main__":
  run()
