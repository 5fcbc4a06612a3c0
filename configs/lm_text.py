"""A text-only GPT on your own UTF-8 text files.

The config lives in the package (gptjax/configs/lm_text.py) so that an installed gptjax has it
too (`--config lm_text`); this file keeps `--config configs/lm_text.py` working.
"""
from gptjax.configs.lm_text import get_config  # noqa: F401
