"""The compression recipe: teacher -> distilled mini student -> pruned -> int8, each stage
measured the same way.

  python -m gptjax.compress.recipe --config configs/mini_recipe.py --workdir runs/mini

Stages (each resumable: its training run checkpoints in ``<workdir>/<stage>``):
  1. teacher  — trained from ``config.teacher`` (or reused if its workdir is complete);
  2. student  — distilled from the frozen teacher (``config.distill``);
  3. pruned   — structured pruning of the student (MLP neurons / attention heads / CNN
                channels removed, so the arrays really shrink), optional unstructured
                sparsity, then a short distillation fine-tune (``config.pruned``);
  4. int8     — post-training int8 quantization (weights + calibrated activations, qwix;
                ``config.int8``).
Every stage is evaluated on the same test split by ``gptjax.train.evaluate.evaluate``:
parameters, bytes on disk (the saved parameter checkpoint, measured), eval loss, caption
exact-match, VQA accuracy and decode tokens/s on this machine (``config.report``). Results:
``report.md`` (one table), ``report.json`` and ``report.png``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import time
from typing import Optional

import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from gptjax.batch import image_to_float
from gptjax.compress import distill as distill_lib
from gptjax.compress import hooks as compress_hooks
from gptjax.compress import prune as prune_lib
from gptjax.compress.report import TASK_COLUMNS, StageResult, write_report
from gptjax.config import ModelConfig
from gptjax.generate import generate
from gptjax.model import count_params
from gptjax.tasks import image_codes_store
from gptjax.train import config as train_config
from gptjax.train import draw_data
from gptjax.train.checkpoint import CheckpointCorruptError
from gptjax.train.config import fail, tokenizer_for, vision_section
from gptjax.train.data import load_split, pipeline_for
from gptjax.train.evaluate import evaluate, retrieval_eval, wants_retrieval
from gptjax.train.evaluate_draw import draw_metrics
from gptjax.train.loop import RUN_ERRORS, run
from gptjax.train.metrics import setup_cli_logging

STAGES = ("teacher", "student", "pruned", "int8")


def recipe_config(teacher: ml_collections.ConfigDict,
                  student: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The recipe's schema, locked (a mistyped key raises an error naming it): two training
  configs (``teacher``, ``student``; full schemas, e.g. ``gptjax.runs.base_config()``) and
  one section per later stage."""
  c = ml_collections.ConfigDict()
  c.teacher = teacher
  c.student = student
  c.distill = ml_collections.ConfigDict(dict(
      alpha=0.5,  # weight of the KL to the teacher (1 - alpha: cross-entropy to the labels)
      temperature=2.0,
      hidden_weight=0.0))  # > 0: also match the teacher's final hidden states
  c.pruned = ml_collections.ConfigDict(dict(
      mlp_keep_fraction=1.0,  # structured: fraction of every block's MLP neurons kept
      cnn_keep_fraction=1.0,  # structured: fraction of every CNN conv's channels kept
      heads_keep=0,  # structured: attention heads kept per layer (0 keeps all)
      sparsity=0.0,  # then this fraction of the remaining kernel weights zeroed (gradual)
      finetune_steps=300))  # distillation fine-tune of the pruned student
  c.int8 = ml_collections.ConfigDict(dict(
      calibration_batches=4,  # train batches that calibrate the static activation scales
      embeddings=False))  # also int8 token / position tables
  c.report = ml_collections.ConfigDict(dict(
      decode_examples=512,  # greedy-decoded test rows for caption EM / VQA accuracy
      speed_batch=8, speed_new_tokens=32,  # decode tokens/s: batch (0: skip) and new tokens
      teacher_samples=False))  # the teacher run prints its test metrics + held-out samples
  c.lock()
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """The recipe's own sections, and both training configs, checked before any training
  starts (a bad value must not surface after the teacher's minutes of training)."""
  compress_hooks.require_qwix("the compression recipe (its int8 stage and artifact storage)")
  p = c.pruned
  for key in ("mlp_keep_fraction", "cnn_keep_fraction"):
    if not 0.0 < p[key] <= 1.0:
      fail(f"pruned.{key}", p[key], "must be in (0, 1] (the fraction kept)")
  if not 0.0 <= p.sparsity < 1.0:
    fail("pruned.sparsity", p.sparsity, "must be in [0, 1)")
  if p.heads_keep < 0:
    fail("pruned.heads_keep", p.heads_keep, "must be >= 0 (0 keeps every head)")
  if p.finetune_steps < 1:
    fail("pruned.finetune_steps", p.finetune_steps, "must be a positive integer")
  if c.int8.calibration_batches < 1:
    fail("int8.calibration_batches", c.int8.calibration_batches, "must be a positive integer")
  d = c.distill
  if not 0.0 <= d.alpha <= 1.0:
    fail("distill.alpha", d.alpha, "must be in [0, 1]")
  if not d.temperature > 0:
    fail("distill.temperature", d.temperature, "must be > 0")
  if d.hidden_weight < 0:
    fail("distill.hidden_weight", d.hidden_weight, "must be >= 0")
  if c.report.speed_batch < 0:
    fail("report.speed_batch", c.report.speed_batch, "must be >= 0 (0 skips the decode-speed "
         "measurement)")
  if c.report.speed_new_tokens < 1:
    fail("report.speed_new_tokens", c.report.speed_new_tokens, "must be a positive integer")
  if c.report.decode_examples < 0:
    fail("report.decode_examples", c.report.decode_examples, "must be >= 0")
  for name in ("teacher", "student"):
    compress_hooks.validate(c[name])
  distill_lib.check_compatible(train_config.validate(c.teacher),
                               train_config.validate(c.student))


def with_model(c: ml_collections.ConfigDict, cfg: ModelConfig) -> ml_collections.ConfigDict:
  """A copy of training config ``c`` whose model section is ``cfg``."""
  c = copy.deepcopy(c)
  c.unlock()
  d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  vision = d.pop("vision")
  d["vision"] = None if vision is None else vision_section(**dataclasses.asdict(vision))
  c.model = ml_collections.ConfigDict(d)
  c.lock()
  return c


def _inner(c: ml_collections.ConfigDict, final_eval: bool = False) -> ml_collections.ConfigDict:
  """Training runs inside the recipe skip their own final eval (the recipe evaluates
  every stage itself, identically), except the teacher's when ``final_eval``: its printed
  test metrics and held-out samples are what ``make demo`` shows of the trained VLM."""
  c = copy.deepcopy(c)
  c.eval.at_end = final_eval
  c.logging.plot = final_eval
  return c


def decode_speed(model: nnx.Module, c, *, batch: int, new_tokens: int, reps: int = 3) -> float:
  """Greedy decode tokens/s on real test prompts (and images), no early stop, after one
  compiling call."""
  src = load_split(c, c.data.test_split)
  local = next(iter(pipeline_for(c, src, train=False, batch_size=batch)))
  prompt = jnp.asarray(local["prompt"])
  image = image_to_float(local["image"]) if "image" in local else None
  kw = dict(image=image, prompt_mask=prompt != tokenizer_for(c).pad_id)
  generate(model, prompt, new_tokens, **kw).block_until_ready()  # compile
  t0 = time.perf_counter()
  for _ in range(reps):
    generate(model, prompt, new_tokens, **kw).block_until_ready()
  return reps * batch * new_tokens / (time.perf_counter() - t0)


def task_metrics(model: nnx.Module, c, teacher_c, codes_dir: Optional[str]) -> dict:
  """The teacher's other tasks on ``c``'s test split: retrieval recall@1 when the teacher's
  eval has ``eval.retrieval`` (its gallery size), drawing when the teacher drew
  (``draw.enabled``) and this stage has an image tokenizer in ``codes_dir``."""
  out = {}
  split = c.data.test_split
  if teacher_c.eval.get("retrieval", False):
    rc = copy.deepcopy(c)
    rc.eval.retrieval = True
    rc.eval.retrieval_examples = teacher_c.eval.retrieval_examples
    src = load_split(rc, split)
    if wants_retrieval(model, rc, src):
      out.update({k: v for k, v in retrieval_eval(model, rc, src).items()
                  if k in TASK_COLUMNS})
  if teacher_c.get("draw", {}).get("enabled", False) and codes_dir and os.path.isdir(codes_dir):
    m = draw_metrics(model, c, split, image_codes_store.load(codes_dir))
    out.update({k: v for k, v in m.items() if k in TASK_COLUMNS})
  return out


def evaluate_stage(name: str, model: nnx.Module, c, bytes_on_disk: int, note: str = "",
                   *, decode_examples: int, speed_batch: int, speed_new_tokens: int,
                   params: Optional[int] = None, tasks: Optional[dict] = None) -> StageResult:
  """Same measurements for every stage, on the test split of training config ``c``
  (``decode_examples`` greedy-decoded rows; decode speed at ``speed_batch`` rows x
  ``speed_new_tokens``)."""
  from gptjax.compress.quantize import state_bytes  # qwix: an optional dependency
  metrics, _ = evaluate(model, c, c.data.test_split, decode_examples=decode_examples)
  tps = (decode_speed(model, c, batch=speed_batch, new_tokens=speed_new_tokens)
         if speed_batch else 0.0)
  return StageResult(name, params or count_params(model), bytes_on_disk,
                     int(state_bytes(nnx.state(model, nnx.Param))), metrics["loss"],
                     metrics.get("caption_exact_match"), metrics.get("vqa_accuracy"), tps, note,
                     tasks or {})


def _fresh(directory: str) -> str:
  """Artifacts are re-derived from the stage checkpoints on every run: replace them."""
  shutil.rmtree(directory, ignore_errors=True)
  return directory


def save_float_params(model: nnx.Module, directory: str) -> int:
  from gptjax.compress.quantize import save_pytree  # qwix: an optional dependency
  return save_pytree(nnx.state(model, nnx.Param), _fresh(directory))


def calibration_batches(c, n: int) -> list[dict]:
  src = load_split(c, c.data.train_split)
  it = iter(pipeline_for(c, src, train=False, batch_size=c.eval.batch_size))
  out = []
  for _ in range(n):
    b = next(it)
    out.append({k: b[k] for k in ("inputs", "image", "segment_ids", "positions") if k in b})
  return out


def _prune_structured(student: nnx.Module, p) -> tuple[ModelConfig, nnx.State, list[str]]:
  cfg, params = student.config, nnx.state(student, nnx.Param)
  notes = []
  if p.mlp_keep_fraction < 1.0:
    keep = max(1, int(round(cfg.mlp_dim * p.mlp_keep_fraction)))
    cfg, params = prune_lib.prune_neurons((cfg, params), keep)
    notes.append(f"MLP {student.config.mlp_dim}->{keep}")
  if p.cnn_keep_fraction < 1.0 and cfg.vision is not None and cfg.vision.kind == "cnn":
    chans = tuple(cfg.vision.cnn_channels)
    keep = tuple(max(1, int(round(ch * p.cnn_keep_fraction))) for ch in chans)
    cfg, params = prune_lib.prune_channels((cfg, params), keep)
    notes.append(f"CNN channels {chans}->{keep}")
  if p.heads_keep:
    cfg, params = prune_lib.prune_heads((cfg, params), p.heads_keep)
    notes.append(f"heads {student.config.num_heads}->{p.heads_keep}")
  return cfg, params, notes


@contextlib.contextmanager
def _checkpoint_hint(section: Optional[str]):
  """A stage's unreadable checkpoint, its hint in this CLI's terms: the stage trains from
  ``config.<section>``, so the override is ``--config.<section>.checkpoint.step=N``. The
  pruned stage (``section`` None) trains from a config derived from ``config.student``,
  where that override would also restart the student stage: only the delete hint."""
  try:
    yield
  except CheckpointCorruptError as e:
    raise e.with_prefix(section) from e


def run_recipe(c: ml_collections.ConfigDict, workdir: str) -> list[StageResult]:
  """All four stages into ``workdir``; returns one ``StageResult`` per stage."""
  validate(c)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  r = c.report
  stage_dir = {"teacher": "teacher", "student": "student", "pruned": "pruned",
               "int8": "pruned"}  # the int8 model draws with the pruned stage's codes
  measure = lambda name, model, nbytes, note="", params=None: evaluate_stage(  # noqa: E731
      name, model, c.student, nbytes, note, decode_examples=r.decode_examples,
      speed_batch=r.speed_batch, speed_new_tokens=r.speed_new_tokens, params=params,
      tasks=task_metrics(model, c.student, c.teacher, os.path.join(
          workdir, stage_dir[name], draw_data.CODES_DIR)))
  say = lambda msg: print(f"[recipe] {msg}", flush=True)  # noqa: E731
  artifact = lambda name: os.path.join(workdir, "artifacts", name)  # noqa: E731
  results = []

  say("stage 1/4: teacher")
  tdir = os.path.join(workdir, "teacher")
  with _checkpoint_hint("teacher"):
    run(_inner(c.teacher, final_eval=c.report.teacher_samples), tdir,
        compress_hooks.hooks_for(c.teacher))
  teacher = compress_hooks.load_model(tdir)
  results.append(measure("teacher", teacher, save_float_params(teacher, artifact("teacher")),
                         "float32"))
  say(f"teacher: {results[-1]}")

  say("stage 2/4: distil the student")
  d = c.distill
  twidth = teacher.config.width if d.hidden_weight else None
  sdir = os.path.join(workdir, "student")
  with _checkpoint_hint("student"):
    distill_lib.distill(_inner(c.student), sdir, teacher, alpha=d.alpha,
                        temperature=d.temperature, hidden_weight=d.hidden_weight)
  student = compress_hooks.load_model(sdir, hooks=distill_lib.student_hooks(twidth))
  results.append(measure("student", student, save_float_params(student, artifact("student")),
      f"distilled, {count_params(teacher) / count_params(student):.1f}x fewer params"))
  say(f"student: {results[-1]}")

  say("stage 3/4: prune")
  p = c.pruned
  cfg, params, notes = _prune_structured(student, p)
  pc = with_model(c.student, cfg)
  pc.unlock()
  pc.train.steps = p.finetune_steps
  if p.sparsity:
    # Unstructured on top of structured: the fine-tune prunes the smaller model's kernels
    # gradually (global L1, cubic schedule over its first 3/4) and keeps them at zero.
    pc.prune.update(dict(enabled=True, method="global", final_sparsity=p.sparsity,
                         begin_step=0, end_step=-1, frequency=10))
  pc.lock()
  pdir = os.path.join(workdir, "pruned")
  with _checkpoint_hint(None):
    distill_lib.distill(_inner(pc), pdir, teacher, alpha=d.alpha, temperature=d.temperature,
                        hidden_weight=d.hidden_weight, init_params=params)
  pruned = compress_hooks.load_model(pdir, hooks=distill_lib.student_hooks(twidth))
  if p.sparsity:
    measured = prune_lib.sparsity_report(nnx.state(pruned, nnx.Param))["global"]
    notes.append(f"{measured:.0%} of kernel weights zero")
  results.append(measure("pruned", pruned, save_float_params(pruned, artifact("pruned")),
                         ", ".join(notes) + f", {p.finetune_steps} fine-tune steps"))
  say(f"pruned: {results[-1]}")

  say("stage 4/4: int8 quantization")
  from gptjax.compress import quantize  # qwix: an optional dependency
  q = quantize.ptq_int8(pruned, calibration_batches(pc, c.int8.calibration_batches))
  qnote = "int8 weights + calibrated int8 activations"
  if c.int8.embeddings:
    q = quantize.quantize_embeddings(q)
    qnote += " + int8 embedding/position tables"
  nbytes = quantize.save_quantized(q, _fresh(artifact("int8")))
  # Parameter count of the quantized model = that of the model it quantizes (qwix adds
  # scales, which are storage, not parameters).
  results.append(measure("int8", q, nbytes, qnote, params=count_params(pruned)))
  say(f"int8: {results[-1]}")

  table = write_report(results, workdir, results[0])
  print(table, flush=True)
  png = os.path.join(workdir, "report.png")
  say(f"report: {os.path.join(workdir, 'report.md')}"
      + (f", plot: {png}" if os.path.exists(png) else ""))
  return results


def define_flags() -> None:
  """The recipe's command-line flags (``--config FILE``, ``--config.x.y=...``,
  ``--workdir``); defined on demand, not at import, so importing the recipe defines none."""
  config_flags.DEFINE_config_file("config", None, "a recipe config file, e.g. "
                                  "configs/mini_recipe.py", lock_config=True)
  flags.DEFINE_string("workdir", None, "recipe directory (one sub-directory per stage)")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_cli_logging()
  try:
    validate(flags.FLAGS.config)  # a bad value or a missing extra: one line, before training
  except ValueError as e:
    sys.exit(f"gptjax-compress: {e}")
  try:
    run_recipe(flags.FLAGS.config, flags.FLAGS.workdir)
  except RUN_ERRORS as e:  # the message says how to recover: no traceback
    print(f"{os.path.basename(argv[0])}: error: {type(e).__name__}: {e}", file=sys.stderr,
          flush=True)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
