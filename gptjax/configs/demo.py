"""Demo: a small VLM learns to caption and answer questions about the built-in `shapes`
images on a laptop CPU (2 cores, < 10 minutes). `make train-demo` runs this
(`gptjax-train --config demo --workdir runs/demo_vlm`).

What makes it fit the budget (each measured, see BENCHMARKS.md):
- the ``shapes`` word tokenizer (bytes + the dataset's words): rows ~4x shorter than bytes,
  and a question's shape word is one token, shared with the caption's;
- packed rows: all four tasks of an image in one segment-isolated row, so each step sees
  16 images and encodes each once;
- a global (max-pooled) image token next to the 8x8 grid of CNN tokens, so the encoder
  learns shape features before the decoder has learnt where to look;
- fixed 2-D sin-cos positions on the grid tokens, for "left of" and left-to-right order;
- lr 1e-3 (3e-3 stalled: kind-dependent answers stayed at chance for 1000+ steps).
"""
from gptjax.data.tokenizers import make_tokenizer
from gptjax.runs import base_config
from gptjax.train.config import model_section, vision_section


def get_config():
  c = base_config()
  c.data.name = "shapes"
  c.data.task = "vqa"
  c.data.tokenizer = "shapes"
  c.data.prompt_len = 12  # longest shapes question: 10 tokens with <bos>/<sep>
  c.data.target_len = 16  # longest caption: 12 tokens with <eos>
  c.data.pack = True
  c.data.packed_len = 48  # all four tasks of any record fit (max 46 tokens)
  c.model = model_section(
      # 63 text tokens + 65 image tokens (8x8 grid + global): a 128-row position table.
      "mini", max_seq_len=63, dropout=0.0,
      vocab_size=make_tokenizer(c.data.tokenizer).vocab_size,
      vision=vision_section(kind="cnn", image_size=32, cnn_channels=(32, 64), width=128,
                            global_token=True, cnn_pos_embed=True))
  c.train.steps = 4000
  c.train.batch_size = 16
  c.train.log_every = 50
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every = 1000
  c.eval.every = 1000
  c.eval.decode_examples = 512
  return c
