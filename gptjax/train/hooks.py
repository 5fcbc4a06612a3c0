"""``RunHooks``: the one way another trainer or a compression method changes what ``run``
trains (the trainer itself knows nothing of distillation, pruning or quantization)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


@dataclasses.dataclass
class RunHooks:
  """How another trainer (distillation, pruning fine-tune, QAT) reuses ``run``.

  ``model_fn(cfg, seed)``: the module to train (default GPT/VLM). ``eval_model(module)``:
  the GPT/VLM inside it to evaluate and sample from. ``loss_fn(module, batch, aux)`` and
  ``aux`` (+ ``aux_shardings``): the step's loss and its extra argument (e.g. a frozen
  teacher's params). ``wrap_tx(tx)``: wrap the optimizer (e.g. gradual pruning).
  ``init_params``: start from these parameters instead of a random init.

  ``run`` and ``load_model`` both build the module and optimizer through these hooks, so a
  workdir reloads as exactly what was trained when given the same hooks.
  """
  model_fn: Optional[Callable] = None
  eval_model: Callable = lambda m: m
  loss_fn: Optional[Callable] = None
  aux: Any = None
  aux_shardings: Any = None
  wrap_tx: Optional[Callable] = None
  init_params: Any = None

  def replace(self, **changes) -> "RunHooks":
    return dataclasses.replace(self, **changes)
