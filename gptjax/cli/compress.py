"""``gptjax-compress``: the compression recipe (teacher -> distilled student -> pruned ->
int8, with a report), as ``python -m gptjax.compress.recipe`` runs it.

  gptjax-compress --config mini_recipe --workdir runs/demo
  gptjax-compress --config mini_recipe --config.pruned.finetune_steps=100 --workdir runs/x

``--config`` is a shipped recipe config's name (``mini_recipe``) or a path to a file with
``get_config()`` returning ``gptjax.compress.recipe.recipe_config(...)``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import app

from gptjax import configs as shipped
from gptjax.cli.configs import resolve_config_arg
from gptjax.compress import recipe


def run(argv: Optional[Sequence[str]] = None) -> None:
  """The console script: parse ``argv`` (default ``sys.argv``) and run the recipe."""
  argv = resolve_config_arg(list(sys.argv if argv is None else argv), shipped.RECIPE)
  recipe.define_flags()
  app.run(recipe.main, argv=argv)
