"""Fine-tune pretrained GPT-2 on your own text (the config lives in the package,
gptjax/configs/finetune_gpt2.py, so an installed gptjax has it as `--config finetune_gpt2`)."""
from gptjax.configs.finetune_gpt2 import get_config  # noqa: F401
