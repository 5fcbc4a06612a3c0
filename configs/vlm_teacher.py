"""A larger VLM on the built-in `shapes` data: a stronger teacher for compression.

The config lives in the package (gptjax/configs/vlm_teacher.py) so that an installed gptjax has it
too (`--config vlm_teacher`); this file keeps `--config configs/vlm_teacher.py` working.
"""
from gptjax.configs.vlm_teacher import get_config  # noqa: F401
