"""A larger VLM on the built-in `shapes` data: the teacher that compression distills from.

  python train.py --config configs/vlm_teacher.py --workdir runs/teacher
"""
from gptjax.train.config import base_config, model_section, vision_section


def get_config():
  c = base_config()
  c.model = model_section(
      "mini", max_seq_len=128, width=256, depth=4, num_heads=8, mlp_dim=1024,
      vision=vision_section(kind="vit", image_size=32, patch_size=8, width=256, depth=2,
                            num_heads=8, mlp_dim=512))
  c.data.name = "shapes"
  c.data.task = "vqa"
  c.train.steps = 3000
  c.train.batch_size = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.checkpoint.every = 500
  c.eval.every = 500
  return c
