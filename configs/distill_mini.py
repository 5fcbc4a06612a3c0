"""The mini student distilled from the demo VLM (>= 4x fewer parameters), used by
configs/mini_pipeline.py; on its own it trains the same student from scratch:

  python train.py --config configs/distill_mini.py --workdir runs/mini_scratch
"""
from gptjax.train.config import base_config, model_section, vision_section


def get_config():
  c = base_config()
  c.model = model_section(
      "mini", max_seq_len=128, width=64, depth=2, num_heads=4, mlp_dim=128,
      vision=vision_section(kind="cnn", image_size=32, cnn_channels=(16, 32, 32), width=64))
  c.data.name = "shapes"
  c.data.task = "vqa"
  c.data.pack = True
  c.train.steps = 800
  c.train.batch_size = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.checkpoint.every = 400
  c.eval.every = 0
  return c
