"""The configs shipped with gptjax, one ``get_config()`` per module. ``gptjax-train --config
NAME`` / ``gptjax-compress --config NAME`` take a module name here (``demo``, ``lm_text``,
...) as well as a path to any config file; ``names()`` lists them."""
from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = ("demo", "distill_mini", "lm_text", "vlm_teacher", "gpt2_small_tpu", "finetune_gpt2",
         "caption_folder", "multitask")
RECIPE = ("mini_recipe",)


def names() -> tuple[str, ...]:
  return TRAIN + RECIPE


def path(name: str) -> str:
  """The file of the shipped config ``name``."""
  if name not in names():
    raise ValueError(f"no shipped config {name!r}; shipped: {', '.join(names())}")
  return os.path.join(_HERE, f"{name}.py")
