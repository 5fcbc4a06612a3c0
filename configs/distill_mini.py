"""The mini student distilled from the demo VLM (also trains it from scratch).

The config lives in the package (gptjax/configs/distill_mini.py) so that an installed gptjax has it
too (`--config distill_mini`); this file keeps `--config configs/distill_mini.py` working.
"""
from gptjax.configs.distill_mini import get_config  # noqa: F401
