"""Multitask: one small VLM decoder learns to caption, to answer questions and to DRAW
(caption -> 8x8 image codes) on the built-in ``shapes`` data, demo-sized
(``gptjax-train --config multitask --workdir runs/multitask``; then
``python -m gptjax.tasks.draw --workdir runs/multitask "a red circle and a blue square"
--out out.png``).

What differs from ``demo``:
- a 4-layer decoder (1,057,090 parameters with the vision tower): with the column order and
  draw rows below, single samples drew the prompt's colours and count in 0.31 of prompts
  with the demo's 2 layers and 0.43 with 4 after 6,000 steps (0.54 with guidance), caption /
  VQA as good (BENCHMARKS.md);
- ``draw``: an FSQ image tokenizer (8x8 grid, levels 8x5x5x5 = 1000 codes; measured palette
  accuracy .998 after 3000 steps at batch 64) is trained first and saved in the workdir; its
  codes run column by column (the captions name the shapes left to right, so the decoder
  meets them in the caption's order) and half the training rows are draw rows (10 % of them
  with an empty caption, for classifier-free guidance);
- the vocabulary holds the shapes words (304), the 1000 codes and ``<img>``: 1305, rounded
  up to 1312 (a multiple of 16; the extra ids are never targets and never sampled);
- ``data.target_len`` 64 (a draw row's 64 codes), ``prompt_len`` 14 (the longest caption,
  12 tokens with ``<bos>``, + ``<img>``); packed rows of 80 tokens hold a draw row
  (14 + 64 - 1 = 77) padded as a row of its own, and all four vqa tasks of a record (46);
- drawing samples with nucleus sampling (top-p 0.95) and classifier-free guidance 1.5 and
  keeps the best of 16 samples by the model's own caption likelihood (``draw.best_of``;
  numbers in BENCHMARKS.md);
- a contrastive (SigLIP) head on the image encoder, at weight 0.1, next to the LM loss
  (draw rows carry a blank image and no caption, so they take no part in it).
"""
from gptjax.configs.demo import get_config as demo_config
from gptjax.train.config import draw_section, model_section

CODEBOOK = 8 * 5 * 5 * 5


def get_config():
  c = demo_config()
  c.data.prompt_len = 14
  c.data.target_len = 64
  c.data.packed_len = 80
  m = c.model.to_dict()
  m.update(max_seq_len=80, vocab_size=1312, contrastive_dim=64, depth=4, num_unique_layers=4)
  name = "mini"
  c.model = model_section(name, **{k: v for k, v in m.items() if k != "vision"},
                          vision=c.model.vision)
  c.train.contrastive_weight = 0.1
  c.draw = draw_section(enabled=True, rows_fraction=0.5, uncond_prob=0.1,
                        eval_examples=64, temperature=1.0, top_k=0, top_p=0.95,
                        cfg_scale=1.5, best_of=16)
  c.draw.codes.order = "columns"
  c.draw.codes.steps = 3000
  c.draw.codes.batch_size = 64
  c.train.steps = 6000
  c.eval.every = 2000
  return c
