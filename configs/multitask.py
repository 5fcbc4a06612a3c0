"""Multitask: caption + VQA + drawing on the built-in `shapes` data.

The config lives in the package (gptjax/configs/multitask.py) so that an installed gptjax
has it too (`--config multitask`); this file keeps `--config configs/multitask.py` working.
"""
from gptjax.configs.multitask import get_config  # noqa: F401
