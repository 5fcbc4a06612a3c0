"""The mini student distilled from the demo VLM (>= 4x fewer parameters), used by
the `mini_recipe` config; on its own it trains the same student from scratch:

  gptjax-train --config distill_mini --workdir runs/mini_scratch

Data settings are the demo's (same tokenizer, so the vocabularies match for distillation).
The student is narrower (64), has a 3-stage CNN (4x4 grid + the global token: 17 image
tokens instead of 65) and a short position table: what it keeps float on disk (embeddings,
positions, norms) stays small next to its int8 kernels.
"""
from gptjax.configs import demo
from gptjax.train.config import model_section, vision_section


def get_config():
  c = demo.get_config()
  c.model = model_section(
      # 47 text tokens + 17 image tokens (4x4 grid + global): a 64-row position table.
      "mini", max_seq_len=47, width=56, depth=2, num_heads=4, mlp_dim=128, dropout=0.0,
      vocab_size=c.model.vocab_size,
      vision=vision_section(kind="cnn", image_size=32, cnn_channels=(16, 32, 32), width=64,
                            global_token=True, cnn_pos_embed=True))
  # The demo packs rows of 48 text tokens; every record's four tasks fit in 46, so 47 keeps
  # the packed rows within this student's 47-token text window (validated at start-up).
  c.data.packed_len = 47
  c.train.steps = 4000
  c.optim.lr = 1e-3
  c.checkpoint.every = 1000
  c.eval.every = 0
  return c
