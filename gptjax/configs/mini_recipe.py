"""GPT-4V -> GPT-4o-mini in one run: train the demo VLM (teacher), distil a >=4x smaller
student, prune it (structured), quantize it to int8, and report every stage.

  gptjax-compress --config mini_recipe --workdir runs/mini
  python -m gptjax.compress.recipe --config configs/mini_recipe.py --workdir runs/mini
"""
from gptjax.compress.recipe import recipe_config
from gptjax.configs import demo, distill_mini


def get_config():
  # Fewer steps than `make train-demo` (4000 each) so that the whole recipe, venv set-up
  # included, fits 15 minutes on 2 CPU cores with room for a slower machine (a fresh clone
  # took 14 min 47 s at 4000 + 4000 steps here).
  teacher = demo.get_config()
  teacher.train.steps = 3000
  student = distill_mini.get_config()
  student.train.steps = 3600
  c = recipe_config(teacher, student)
  c.distill.update(dict(alpha=0.7, temperature=2.0, hidden_weight=0.0))
  c.pruned.update(dict(
      mlp_keep_fraction=0.5,  # structured: half the MLP neurons of every block removed
      cnn_keep_fraction=1.0,  # < 1: also remove CNN channels (0.5 cost ~5 points of VQA here)
      heads_keep=0,  # 0 = keep all attention heads
      sparsity=0.5,  # then 50 % of the remaining kernel weights zeroed during the fine-tune
      finetune_steps=300))
  # int8 token / position tables too (the student's largest float arrays).
  c.int8.update(dict(calibration_batches=4, embeddings=True))
  c.report.update(dict(
      decode_examples=512, speed_batch=8, speed_new_tokens=32,
      teacher_samples=True))  # the teacher run prints its test metrics + held-out samples
  return c
