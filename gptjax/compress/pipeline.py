"""teacher -> distilled mini student -> pruned -> int8, each stage measured the same way.

  python -m gptjax.compress.pipeline --config configs/mini_pipeline.py --workdir runs/mini

Stages (each resumable: its training run checkpoints in ``<workdir>/<stage>``):
  1. teacher  — trained with ``gptjax.train.run`` (or reused if its workdir is complete);
  2. student  — distilled from the frozen teacher (``distill.distill``);
  3. pruned   — structured pruning of the student (MLP neurons / attention heads removed,
                so the arrays really shrink), then a short distillation fine-tune;
  4. int8     — post-training int8 quantization (weights + calibrated activations, qwix).
Every stage is evaluated on the same test split: parameters, bytes on disk (the saved
parameter checkpoint, measured), eval loss, caption exact-match, VQA accuracy and decode
tokens/s on this machine. Results: ``report.md`` (one table) and ``report.png``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gptjax import sharding as shd
from gptjax.compress import distill as distill_lib
from gptjax.compress import prune as prune_lib
from gptjax.config import ModelConfig
from gptjax.generate import generate
from gptjax.model import count_params
from gptjax.train import evaluate as ev
from gptjax.train.config import tokenizer_for, validate, vision_section
from gptjax.train.load import load_model
from gptjax.train.loop import batch_shardings, load_split, pipeline_for, run
from gptjax.train.step import MODEL_KEYS, image_to_float, loss_sums


@dataclasses.dataclass
class StageResult:
  stage: str
  params: int
  bytes_on_disk: int
  array_bytes: int  # parameter arrays in memory (int4 at 0.5 B): no file-format overhead
  eval_loss: float
  caption_exact_match: Optional[float]
  vqa_accuracy: Optional[float]
  decode_tokens_per_s: float
  note: str = ""

  def __str__(self) -> str:
    def frac(x):
      return "-" if x is None else f"{x:.3f}"
    return (f"{self.params:,} params, {self.bytes_on_disk:,} bytes on disk, test loss "
            f"{self.eval_loss:.4f}, caption EM {frac(self.caption_exact_match)}, VQA "
            f"{frac(self.vqa_accuracy)}, {self.decode_tokens_per_s:,.0f} decode tok/s")


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
  """Training runs inside the pipeline skip their own final eval (the pipeline evaluates
  every stage itself, identically), except the teacher's when ``final_eval``: its printed
  test metrics and held-out samples are what ``make demo`` shows of the trained VLM."""
  c = copy.deepcopy(c)
  c.eval.at_end = final_eval
  c.logging.plot = final_eval
  return c


def evaluate_stage(name: str, model: nnx.Module, c, bytes_on_disk: int, note: str = "",
                   *, decode_examples: int, speed_batch: int, speed_new_tokens: int,
                   params: Optional[int] = None) -> StageResult:
  """Same measurements for every stage, on the test split."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  shardings = batch_shardings(mesh)
  src = load_split(c, c.data.test_split)
  loss_fn = nnx.jit(lambda m, b: loss_sums(m, {k: v for k, v in b.items() if k in MODEL_KEYS}))
  loss = ev.eval_loss(lambda _, b: loss_fn(model, b), None,
                      pipeline_for(c, src, train=False, batch_size=c.eval.batch_size),
                      shardings, max_batches=c.eval.max_batches)["loss"]
  tok = tokenizer_for(c)
  acc, _ = ev.decode_accuracy(model, pipeline_for(c, src, train=False,
                                                  batch_size=c.eval.batch_size),
                              shardings, max_new_tokens=c.data.target_len,
                              max_examples=decode_examples, tokenizer=tok)
  # Decode speed: real test prompts (and images), greedy, no early stop.
  local = next(iter(pipeline_for(c, src, train=False, batch_size=speed_batch)))
  prompt = jnp.asarray(local["prompt"])
  image = image_to_float(jnp.asarray(local["image"])) if "image" in local else None
  kw = dict(image=image, prompt_mask=prompt != tok.pad_id)
  generate(model, prompt, speed_new_tokens, **kw).block_until_ready()  # compile
  t0 = time.perf_counter()
  reps = 3
  for _ in range(reps):
    generate(model, prompt, speed_new_tokens, **kw).block_until_ready()
  tps = reps * speed_batch * speed_new_tokens / (time.perf_counter() - t0)
  from gptjax.compress.quantize import state_bytes
  return StageResult(name, params or count_params(model), bytes_on_disk,
                     int(state_bytes(nnx.state(model, nnx.Param))), loss,
                     acc.get("caption_exact_match"), acc.get("vqa_accuracy"), tps, note)


def _fresh(directory: str) -> str:
  """Artifacts are re-derived from the stage checkpoints on every run: replace them."""
  shutil.rmtree(directory, ignore_errors=True)
  return directory


def save_float_params(model: nnx.Module, directory: str) -> int:
  from gptjax.compress.quantize import save_pytree
  return save_pytree(nnx.state(model, nnx.Param), _fresh(directory))


def calibration_batches(c, n: int) -> list[dict]:
  src = load_split(c, c.data.train_split)
  it = iter(pipeline_for(c, src, train=False, batch_size=c.eval.batch_size))
  out = []
  for _ in range(n):
    b = next(it)
    out.append({k: b[k] for k in ("inputs", "image", "segment_ids", "positions") if k in b})
  return out


def write_report(results: list[StageResult], workdir: str, teacher: StageResult) -> str:
  lines = ["# Compression report", "",
           "Every stage evaluated on the same test split; bytes = the saved parameter "
           "checkpoint on disk (measured); decode = greedy tokens/s on this machine.", "",
           "| stage | params | bytes on disk | vs teacher | array bytes | eval loss | caption EM "
           "| VQA acc | VQA vs teacher | decode tok/s | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
  for r in results:
    rel_vqa = (r.vqa_accuracy / teacher.vqa_accuracy
               if r.vqa_accuracy is not None and teacher.vqa_accuracy else None)
    lines.append(
        f"| {r.stage} | {r.params:,} | {r.bytes_on_disk:,} | "
        f"1/{teacher.bytes_on_disk / max(r.bytes_on_disk, 1):.1f} | {r.array_bytes:,} | "
        f"{r.eval_loss:.4f} | "
        f"{fmt(r.caption_exact_match)} | {fmt(r.vqa_accuracy)} | {fmt(rel_vqa)} | "
        f"{r.decode_tokens_per_s:,.0f} | {r.note} |")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
  _plot(results, os.path.join(workdir, "report.png"))
  return "\n".join(lines)


def _plot(results: list[StageResult], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  x = [r.bytes_on_disk for r in results]
  for key, marker in (("vqa_accuracy", "o-"), ("caption_exact_match", "s--")):
    y = [getattr(r, key) for r in results]
    if all(v is not None for v in y):
      ax.plot(x, y, marker, label=key)
  for r in results:
    ax.annotate(r.stage, (r.bytes_on_disk, r.vqa_accuracy or 0), textcoords="offset points",
                xytext=(4, 6), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("bytes on disk (log)")
  ax.set_ylabel("accuracy (test split)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("quality vs size")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def check_config(c: ml_collections.ConfigDict) -> None:
  """The pipeline's own sections, and both training configs, checked before any training
  starts (a bad value must not surface after the teacher's minutes of training)."""
  from gptjax.train.config import _fail
  p = c.prune
  for key in ("mlp_keep_fraction", "cnn_keep_fraction"):
    v = p.get(key, 1.0)
    if not 0.0 < v <= 1.0:
      _fail(f"prune.{key}", v, "must be in (0, 1] (the fraction kept)")
  v = p.get("sparsity", 0.0)
  if not 0.0 <= v < 1.0:
    _fail("prune.sparsity", v, "must be in [0, 1)")
  if p.heads_keep < 0:
    _fail("prune.heads_keep", p.heads_keep, "must be >= 0 (0 keeps every head)")
  if p.finetune_steps < 1:
    _fail("prune.finetune_steps", p.finetune_steps, "must be a positive integer")
  if c.quantize.method != "int8":
    _fail("quantize.method", c.quantize.method, "allowed values are ('int8',)")
  if c.quantize.calibration_batches < 1:
    _fail("quantize.calibration_batches", c.quantize.calibration_batches,
          "must be a positive integer")
  d = c.distill
  if not 0.0 <= d.alpha <= 1.0:
    _fail("distill.alpha", d.alpha, "must be in [0, 1]")
  if not d.temperature > 0:
    _fail("distill.temperature", d.temperature, "must be > 0")
  if d.hidden_weight < 0:
    _fail("distill.hidden_weight", d.hidden_weight, "must be >= 0")
  for key in ("speed_batch", "speed_new_tokens"):
    if c.report[key] < 1:
      _fail(f"report.{key}", c.report[key], "must be a positive integer")
  if c.report.decode_examples < 0:
    _fail("report.decode_examples", c.report.decode_examples, "must be >= 0")
  distill_lib.check_compatible(validate(c.teacher), validate(c.student))


def run_pipeline(c: ml_collections.ConfigDict, workdir: str) -> list[StageResult]:
  check_config(c)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  r = c.report
  measure = lambda name, model, nbytes, note="", params=None: evaluate_stage(  # noqa: E731
      name, model, c.student, nbytes, note, decode_examples=r.decode_examples,
      speed_batch=r.speed_batch, speed_new_tokens=r.speed_new_tokens, params=params)
  say = lambda msg: print(f"[pipeline] {msg}", flush=True)  # noqa: E731
  results = []

  # 1. Teacher.
  say("stage 1/4: teacher")
  tdir = os.path.join(workdir, "teacher")
  run(_inner(c.teacher, final_eval=bool(c.report.get("teacher_samples", False))), tdir)
  teacher = load_model(tdir)
  results.append(measure("teacher", teacher, save_float_params(teacher, os.path.join(
      workdir, "artifacts", "teacher")), "float32"))
  say(f"teacher: {results[-1]}")

  # 2. Distilled student.
  say("stage 2/4: distil the student")
  scfg = validate(c.student)
  distill_lib.check_compatible(teacher.config, scfg)
  d = c.distill
  twidth = teacher.config.width if d.hidden_weight else None
  sdir = os.path.join(workdir, "student")
  distill_lib.distill(_inner(c.student), sdir, teacher, alpha=d.alpha,
                      temperature=d.temperature, hidden_weight=d.hidden_weight)
  student = load_model(sdir, model_fn=distill_lib.student_model_fn(twidth),
                       select=lambda m: m.model)
  results.append(measure("student", student, save_float_params(student, os.path.join(
      workdir, "artifacts", "student")),
      f"distilled, {count_params(teacher) / count_params(student):.1f}x fewer params"))
  say(f"student: {results[-1]}")

  # 3. Structured pruning + distillation fine-tune.
  say("stage 3/4: prune")
  p = c.prune
  cfg, params = student.config, nnx.state(student, nnx.Param)
  notes = []
  if p.mlp_keep_fraction < 1.0:
    keep = max(1, int(round(cfg.ffn_dim * p.mlp_keep_fraction)))
    cfg, params = prune_lib.prune_neurons((cfg, params), keep)
    notes.append(f"MLP {student.config.ffn_dim}->{keep}")
  cnn_keep = p.get("cnn_keep_fraction", 1.0)
  if cnn_keep < 1.0 and cfg.vision is not None and cfg.vision.kind == "cnn":
    chans = tuple(cfg.vision.cnn_channels)
    keep = tuple(max(1, int(round(ch * cnn_keep))) for ch in chans)
    cfg, params = prune_lib.prune_channels((cfg, params), keep)
    notes.append(f"CNN channels {chans}->{keep}")
  if p.heads_keep:
    cfg, params = prune_lib.prune_heads((cfg, params), p.heads_keep)
    notes.append(f"heads {student.config.num_heads}->{p.heads_keep}")
  pc = with_model(c.student, cfg)
  pc.unlock()
  pc.train.steps = p.finetune_steps
  sparsity = p.get("sparsity", 0.0)
  if sparsity:
    # Unstructured on top of structured: the fine-tune prunes the smaller model's kernels
    # gradually (global L1, cubic schedule over its first 3/4) and keeps them at zero.
    pc.prune.update(dict(enabled=True, method="global", final_sparsity=sparsity,
                         begin_step=0, end_step=-1, frequency=10))
  pc.lock()
  pdir = os.path.join(workdir, "pruned")
  distill_lib.distill(_inner(pc), pdir, teacher, alpha=d.alpha, temperature=d.temperature,
                      hidden_weight=d.hidden_weight, init_params=params)
  pruned = load_model(pdir, model_fn=distill_lib.student_model_fn(twidth),
                      select=lambda m: m.model)
  if sparsity:
    measured = prune_lib.sparsity_report(nnx.state(pruned, nnx.Param))["global"]
    notes.append(f"{measured:.0%} of kernel weights zero")
  results.append(measure("pruned", pruned, save_float_params(pruned, os.path.join(
      workdir, "artifacts", "pruned")), ", ".join(notes) + f", {p.finetune_steps} fine-tune steps"))
  say(f"pruned: {results[-1]}")

  # 4. int8 post-training quantization.
  say("stage 4/4: int8 quantization")
  from gptjax.compress import quantize
  q = quantize.ptq_int8(pruned, calibration_batches(pc, c.quantize.calibration_batches))
  qnote = "int8 weights + calibrated int8 activations"
  if c.quantize.get("embeddings", False):
    q = quantize.quantize_embeddings(q)
    qnote += " + int8 embedding/position tables"
  nbytes = quantize.save_quantized(q, _fresh(os.path.join(workdir, "artifacts", "int8")))
  # Parameter count of the quantized model = that of the model it quantizes (qwix adds
  # scales, which are storage, not parameters).
  results.append(measure("int8", q, nbytes, qnote,
                         params=count_params(pruned)))
  say(f"int8: {results[-1]}")

  table = write_report(results, workdir, results[0])
  print(table, flush=True)
  say(f"report: {os.path.join(workdir, 'report.md')}, plot: {os.path.join(workdir, 'report.png')}")
  return results


def main(argv):
  del argv
  from absl import flags
  from gptjax.train.metrics import setup_cli_logging
  setup_cli_logging()
  run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "configs/mini_pipeline.py", lock_config=True)
  flags.DEFINE_string("workdir", None, "pipeline directory (one sub-directory per stage)")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
