"""GPT-2 small (124M) on a Cloud TPU slice: FSDP, bf16 compute, remat.

The config lives in the package (gptjax/configs/gpt2_small_tpu.py) so that an installed gptjax has it
too (`--config gpt2_small_tpu`); this file keeps `--config configs/gpt2_small_tpu.py` working.
"""
from gptjax.configs.gpt2_small_tpu import get_config  # noqa: F401
