"""Demo: a small VLM on the built-in `shapes` data (`make train-demo`).

The config lives in the package (gptjax/configs/demo.py) so that an installed gptjax has it
too (`--config demo`); this file keeps `--config configs/demo.py` working.
"""
from gptjax.configs.demo import get_config  # noqa: F401
