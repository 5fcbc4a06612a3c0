"""A larger VLM on the built-in `shapes` data (the demo's data settings and tokenizer): a
stronger teacher for compression, sized for a GPU / TPU rather than a laptop.

  gptjax-train --config vlm_teacher --workdir runs/teacher
"""
from gptjax.configs import demo
from gptjax.train.config import model_section, vision_section


def get_config():
  c = demo.get_config()
  c.model = model_section(
      # 63 text tokens + 65 image tokens (8x8 patches + global): a 128-row position table.
      "mini", max_seq_len=63, width=256, depth=4, num_heads=8, mlp_dim=1024, dropout=0.0,
      vocab_size=c.model.vocab_size,
      vision=vision_section(kind="vit", image_size=32, patch_size=4, width=256, depth=2,
                            num_heads=8, mlp_dim=512, global_token=True))
  c.train.steps = 6000
  c.train.batch_size = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.checkpoint.every = 1000
  c.eval.every = 1000
  return c
