"""Demo: a small VLM learns to caption and answer questions about the built-in `shapes`
images on a laptop CPU. `make demo` runs this.

Packed rows (all four tasks of an image in one row, segment-isolated) make each step see
16 images; a CNN with two pooling stages gives 64 image tokens of 4x4 pixels each.
"""
from gptjax.train.config import base_config, model_section, vision_section


def get_config():
  c = base_config()
  c.model = model_section(
      "mini", max_seq_len=192, dropout=0.0,
      vision=vision_section(kind="cnn", image_size=32, cnn_channels=(32, 64), width=128))
  c.data.name = "shapes"
  c.data.task = "vqa"
  c.data.pack = True
  c.train.steps = 1500
  c.train.batch_size = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every = 500
  c.eval.every = 500
  c.eval.decode_examples = 512
  return c
