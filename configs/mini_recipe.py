"""The compression recipe of `make demo`: teacher -> student -> pruned -> int8.

The config lives in the package (gptjax/configs/mini_recipe.py) so that an installed gptjax has it
too (`--config mini_recipe`); this file keeps `--config configs/mini_recipe.py` working.
"""
from gptjax.configs.mini_recipe import get_config  # noqa: F401
