"""The teacher -> student -> pruned -> int8 recipe end to end, at toy scale: every stage
runs, resumes, and the report's measured sizes shrink the way each stage says."""
import os
import re

import ml_collections
import numpy as np
import pytest

from gptjax.compress.recipe import recipe_config, run_recipe
from gptjax.runs import base_config
from gptjax.train.config import model_section, shapes_kwargs, vision_section


def _train_config(data_dir, *, width, mlp, steps):
  c = base_config()
  c.model = model_section("tiny", max_seq_len=112, width=width, num_heads=4, num_kv_heads=None,
                          mlp_dim=mlp, vision=vision_section(kind="cnn", image_size=16,
                                                             cnn_channels=(8, 16), width=16))
  c.data.data_dir = str(data_dir)
  c.data.builder_kwargs = shapes_kwargs(image_size=16, train_size=128, validation_size=32,
                                        test_size=32)
  c.data.pack, c.data.packed_len = True, 112  # + 16 image tokens: 128 positions
  c.train.steps, c.train.batch_size, c.train.log_every = steps, 8, 5
  c.optim.warmup_steps = 2
  c.checkpoint.every = 1000
  c.eval.every, c.eval.batch_size, c.eval.max_batches, c.eval.decode_examples = 0, 16, 1, 16
  c.logging.progress = c.logging.tensorboard = False
  return c


def _saved_arrays(directory) -> dict:
  """{'a/b/kernel': array} from a saved parameter pytree (orbax), read back independently."""
  import jax
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.abspath(directory))
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _recipe_config(data_dir):
  c = recipe_config(_train_config(data_dir, width=64, mlp=256, steps=6),
                    _train_config(data_dir, width=32, mlp=64, steps=4))
  c.distill.update(dict(alpha=0.5, temperature=2.0, hidden_weight=0.0))
  c.pruned.update(dict(mlp_keep_fraction=0.5, heads_keep=0, sparsity=0.5, finetune_steps=4))
  c.int8.calibration_batches = 1
  c.report.update(dict(decode_examples=16, speed_batch=2, speed_new_tokens=4))
  c.teacher.eval.retrieval, c.teacher.eval.retrieval_examples = True, 4  # report columns
  return c


def test_recipe_config_is_locked():
  c = _recipe_config("unused")
  with pytest.raises(AttributeError, match="sparsityy"):
    c.pruned.sparsityy = 0.5


@pytest.mark.parametrize("key,value,shown", [
    ("pruned.mlp_keep_fraction", 0.0, "(0, 1]"),
    ("pruned.sparsity", 1.0, "[0, 1)"),
    ("pruned.finetune_steps", 0, "positive integer"),
    ("int8.calibration_batches", 0, "positive integer"),
    ("distill.alpha", 1.5, "[0, 1]"),
    ("distill.temperature", 0.0, "> 0"),
    ("report.speed_batch", -1, ">= 0"),
    ("student.model.vocab_size", 300, "vocab_size"),  # the student no longer shares it
])
def test_bad_recipe_config_fails_before_training(tmp_path, key, value, shown):
  c = _recipe_config(tmp_path / "data")
  *sections, name = key.split(".")
  node = c
  for sec in sections:
    node = node[sec]
  node[name] = value
  with pytest.raises(ValueError, match=re.escape(shown)) as info:
    run_recipe(c, str(tmp_path / "run"))
  if not key.startswith("student."):
    assert f"config.{key}={value!r}" in str(info.value)
  assert not os.path.exists(tmp_path / "run" / "teacher")  # nothing was trained


@pytest.mark.slow
def test_recipe_report(tmp_path):
  c = _recipe_config(tmp_path / "data")
  results = run_recipe(c, str(tmp_path / "run"))
  by = {r.stage: r for r in results}
  assert list(by) == ["teacher", "student", "pruned", "int8"]
  assert by["teacher"].params >= 4 * by["student"].params
  assert by["pruned"].params < by["student"].params  # structured pruning really shrinks
  assert by["int8"].params == by["pruned"].params
  # ... and unstructured on top: the fine-tune reached 50 % zeros over the kernels (cubic
  # schedule ending at step 3 of 4), counted here from the saved artifact, not the note.
  assert "50% of kernel weights zero" in by["pruned"].note
  saved = _saved_arrays(tmp_path / "run" / "artifacts" / "pruned")
  kernels = [v for k, v in saved.items() if k.endswith("kernel")]
  zeros = sum(int((v == 0).sum()) for v in kernels)
  # round, not int (floor): pruning prunes torch.nn.utils.prune's count, round(amount * n)
  # (Python's round, half to even): for odd n, 0.5 n = k + .5 rounds to the even of k, k + 1.
  assert zeros == round(0.5 * sum(v.size for v in kernels))
  # Measured bytes on disk shrink with the parameter count. (At this toy size the int8
  # file is dominated by checkpoint metadata; compare its arrays instead: kernels at 1 byte
  # plus float scales, embeddings and norms, so well under the float32 arrays.)
  assert (by["teacher"].bytes_on_disk > by["student"].bytes_on_disk
          > by["pruned"].bytes_on_disk)
  assert by["pruned"].array_bytes == 4 * by["pruned"].params
  assert by["int8"].array_bytes < 0.75 * by["pruned"].array_bytes
  for r in results:
    assert 0.0 <= r.vqa_accuracy <= 1.0 and r.decode_tokens_per_s > 0 and r.eval_loss > 0
  report = (tmp_path / "run" / "report.md").read_text()
  assert all(f"| {s} |" in report for s in by)
  # The teacher evaluates retrieval, so every stage is measured on it (a 4-image gallery).
  assert "i→t R@1 (gen)" in report and "t→i R@1 (gen)" in report
  for r in results:
    assert 0.0 <= r.tasks["gen_i2t_r1"] <= 1.0 and 0.0 <= r.tasks["gen_t2i_r1"] <= 1.0
    assert "draw_all" not in r.tasks  # the teacher does not draw
  assert os.path.exists(tmp_path / "run" / "report.png")
  # Resumable: a second run finds every stage's checkpoint and trains nothing new.
  # (the second pass skips decoding and the speed measurement: it is about resuming)
  c.report.update(dict(decode_examples=0, speed_batch=0))
  c.teacher.eval.retrieval = False
  again = run_recipe(c, str(tmp_path / "run"))
  assert [r.params for r in again] == [r.params for r in results]
