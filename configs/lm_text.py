"""A text-only GPT on your own UTF-8 text files (byte-level, packed sequences).

  python train.py --config configs/lm_text.py --workdir runs/lm \
      --config.data.paths='("~/books/*.txt",)'

By default it trains on this repository's own Python sources, so it runs out of the box.
"""
import ml_collections

from gptjax.runs import base_config
from gptjax.train.config import model_section


def get_config():
  c = base_config()
  c.model = model_section("mini", max_seq_len=256, position="rope")
  c.data.name = "text_files"
  c.data.builder_kwargs = ml_collections.ConfigDict()  # text_files takes only data.paths
  c.data.paths = ("gptjax/**/*.py",)
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
