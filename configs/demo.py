"""Demo: a small VLM learns to caption and answer questions about the built-in `shapes`
images, on 2 CPU cores in a few minutes. `make demo` runs this."""
from gptjax.train.config import base_config, model_section, vision_section


def get_config():
  c = base_config()
  c.model = model_section(
      "mini", max_seq_len=128, dropout=0.0,
      vision=vision_section(kind="cnn", image_size=32, cnn_channels=(32, 64, 64), width=128))
  c.data.name = "shapes"
  c.data.task = "vqa"
  c.data.prompt_len = 40
  c.data.target_len = 60
  c.train.steps = 1500
  c.train.batch_size = 64
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every = 500
  c.eval.every = 500
  c.eval.decode_examples = 512
  return c
