"""A captioner on your own folder of images + captions.jsonl / captions.csv.

The config lives in the package (gptjax/configs/caption_folder.py) so that an installed
gptjax has it too (`--config caption_folder`); this file keeps
`--config configs/caption_folder.py` working.
"""
from gptjax.configs.caption_folder import get_config  # noqa: F401
