"""A text-only GPT on your own UTF-8 text files (byte-level, packed sequences).

  gptjax-train --config lm_text --workdir runs/lm \
      --config.data.paths='("~/books/*.txt",)'

By default it trains on gptjax's own Python sources (wherever the package is installed), so
it runs out of the box from any directory.
"""
import os

import ml_collections

from gptjax.runs import base_config
from gptjax.train.config import model_section, text_kwargs

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  c = base_config()
  c.model = model_section("mini", max_seq_len=256, position="rope")
  c.data.name = "text_files"
  c.data.builder_kwargs = text_kwargs()  # every text_files / tokens option
  c.data.paths = (os.path.join(_PACKAGE, "**", "*.py"),)
  c.data.task = "lm"
  c.data.seq_len = 256
  c.data.eval_split = "validation"
  c.data.test_split = ""  # text_files has train/validation only
  c.train.steps = 2000
  c.train.batch_size = 32
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every = 500
  c.eval.every = 500
  return c
