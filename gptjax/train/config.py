"""The training configuration: one ``ml_collections.ConfigDict`` with a fixed set of keys.

``configs/*.py`` start from ``base_config()`` and override. Every section is locked, so a
mistyped key (``--config.optim.lrr=...`` or ``cfg.optim.lrr = ...``) raises an error naming
it instead of silently doing nothing. ``validate`` checks values once before training.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Optional

import ml_collections

from gptjax.config import ModelConfig, VisionConfig, preset
from gptjax.data.tokenizers import TOKENIZERS, make_tokenizer
from gptjax.tasks.image_codes import ImageCodesConfig

TASKS = ("vqa", "lm")
NONFINITE_POLICIES = ("stop", "skip")
# 2: model.max_seq_len counts text tokens only (before: image + text), model.head_dim
# (before: head_size).
CONFIG_VERSION = 2


def model_section(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every ``ModelConfig`` field of preset ``name`` (+ overrides) as a ConfigDict, so any
  field can be set from the command line (``--config.model.width=256``)."""
  vision = overrides.pop("vision", None)
  # Set after the preset: the head needs a vision encoder, which is added to the section
  # only here (ModelConfig validates the pair when the section is built into one).
  contrastive_dim = overrides.pop("contrastive_dim", 0)
  cfg = preset(name, **overrides)
  d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "vision"}
  d["contrastive_dim"] = contrastive_dim
  if isinstance(vision, VisionConfig):
    vision = vision_section(**dataclasses.asdict(vision))
  d["vision"] = vision
  return ml_collections.ConfigDict(d)


def vision_section(**kw) -> ml_collections.ConfigDict:
  d = dataclasses.asdict(VisionConfig(**kw))
  if d["cnn_pools"] is None:  # typed, so --config.model.vision.cnn_pools=2 parses as an int
    d["cnn_pools"] = ml_collections.config_dict.placeholder(int)
  return ml_collections.ConfigDict(d)


def shapes_kwargs(**kw) -> ml_collections.ConfigDict:
  """Builder arguments of the built-in ``shapes`` data, all present so each is overridable."""
  d = dict(image_size=32, train_size=10_000, validation_size=500, test_size=500, seed=0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


# Options of the text builders, one ConfigDict for both so that a text config can switch
# between raw files (data.name='text_files') and pre-tokenised data ('tokens') from the
# command line; each builder receives only its own keys (gptjax.train.data.load_split).
TEXT_FILES_KEYS = ("validation_fraction", "document_separator", "split_mode")
TOKENS_KEYS = ("windows",)


def text_kwargs(**kw) -> ml_collections.ConfigDict:
  """Builder arguments of the text data, all present so each is overridable:
  ``validation_fraction``, ``document_separator`` ('' = whole files), ``split_mode``
  ('documents' | 'tail') for ``text_files``; ``windows`` ('random' | 'fixed') for ``tokens``."""
  d = dict(validation_fraction=0.05, document_separator="", split_mode="documents",
           windows="random")
  d.update(kw)
  return ml_collections.ConfigDict(d)


def base_config() -> ml_collections.ConfigDict:
  """The training sections, locked (``gptjax.runs.base_config`` adds compression's)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_section("tiny")
  c.data = ml_collections.ConfigDict(dict(
      name="shapes",  # 'shapes' | 'text_files' | any TFDS name prepared as array_record
      tokenizer="byte",  # 'byte' | 'shapes' (bytes + the shapes words: ~4x shorter rows)
      data_dir=None,  # None: <workdir>/../tensorflow_datasets-style default (see loop)
      builder_kwargs=shapes_kwargs(),  # passed to the builder (here: shapes' sizes/seed)
      paths=(),  # text_files: files, globs or directories
      task="vqa",  # 'vqa' (image + prompt -> target) | 'lm' (packed text)
      prompt_len=40, target_len=60,  # vqa (shapes: captions need 59)
      pack=False,  # vqa + softmax attention: all tasks of an image in one row (training)
      packed_len=224,  # text tokens per packed row
      seq_len=128,  # lm
      text_key="text", image_key="image", caption_key="caption",
      train_split="train", eval_split="validation", test_split="test",
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=50, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, clip_norm=1.0, accum_steps=1))
  c.train = ml_collections.ConfigDict(dict(
      steps=500, batch_size=32, log_every=10,
      # A step with a non-finite loss / gradient norm never updates the params. 'stop':
      # the run raises NonFiniteError (no checkpoint of that state); 'skip': train on, up
      # to max_skipped such steps in a row.
      nonfinite="stop", max_skipped=10,
      # > 0: total loss = LM loss + w * SigLIP loss of the model's contrastive head
      # (needs model.contrastive_dim > 0 and a VLM on vqa data with captions).
      contrastive_weight=0.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=200, keep=3, async_save=True,
      step=ml_collections.config_dict.placeholder(int),  # resume from this step (default latest)
      fallback=False))  # True: an unreadable latest step -> resume from the newest readable one
  c.eval = ml_collections.ConfigDict(dict(
      every=250, batch_size=64, max_batches=8,  # loss/perplexity on the eval split
      decode_examples=256,  # greedy-decoded examples for caption / VQA exact match
      samples_to_print=6,
      # Image<->text retrieval recall@1/5/10 (VLM, vqa data with captions): a gallery of the
      # split's first retrieval_examples images and their distinct captions, scored by the
      # decoder's caption likelihood (retrieval_examples x captions decoder passes: keep it
      # small) and, with a contrastive head, by embedding similarity. Off by default: it
      # compiles two more programs and costs retrieval_examples^2 decoder rows per eval.
      retrieval=False, retrieval_examples=64,
      at_end=True))  # final eval + test-split metrics, samples.png
  c.draw = draw_section()
  c.logging = ml_collections.ConfigDict(dict(
      tensorboard=True, plot=True, progress=True,
      # MFU (model FLOPs / s over the measured matmul peak) at each log step; the peak is
      # measured once per process (~1 s) unless peak_flops (FLOP/s, > 0) is given.
      mfu=True, peak_flops=0.0))
  # Layout of this schema; runs saved without it (or with an older one) are migrated when
  # their config.json is loaded (``gptjax.train.load.load_run_config``).
  c.version = CONFIG_VERSION
  c.lock()
  return c


def draw_section(**kw) -> ml_collections.ConfigDict:
  """The draw task (caption -> image codes, ``gptjax.train.draw_data``), off by default.

  ``rows_fraction``: share of training rows that are draw rows; ``uncond_prob``: share of
  draw rows with an empty caption (what classifier-free guidance samples against);
  ``codes``: the image tokenizer (``ImageCodesConfig`` fields, image size from the data)
  and its own training (``steps``, ``batch_size``, Adam ``lr``), run once before the LM;
  eval: ``eval_examples`` captions drawn with ``temperature`` / ``top_k`` (0: all codes) /
  ``top_p`` (nucleus; 1: off) / ``cfg_scale`` (0: no guidance; s > 0 samples from
  uncond + s * (cond - uncond)), and
  ``best_of`` K samples per caption of which the model's own caption likelihood picks one
  (1: single samples; ``gptjax.train.evaluate_draw.draw_best_of``)."""
  d = dict(enabled=False, rows_fraction=0.25, uncond_prob=0.1,
           codes=ml_collections.ConfigDict(dict(
               grid=8, levels=(8, 5, 5, 5), channels=64, depth=1, head=4, order="rows",
               lr=1e-2, warmup=20, steps=3000, batch_size=64)),
           eval_examples=64, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=0.0, best_of=1,
           samples=8)
  d.update(kw)
  return ml_collections.ConfigDict(d)


DRAW_CODES_TRAIN_KEYS = ("steps", "batch_size")  # draw.codes keys that are not ImageCodesConfig's


def image_codes_config(c: ml_collections.ConfigDict):
  """The ``ImageCodesConfig`` of ``draw.codes`` (image side and channels: the VLM's input)."""
  d = {k: v for k, v in c.draw.codes.to_dict().items() if k not in DRAW_CODES_TRAIN_KEYS}
  if isinstance(d.get("levels"), (list, tuple)):
    d["levels"] = tuple(d["levels"])
  vision = c.model.vision
  return _build(ImageCodesConfig, d, "draw.codes", image_size=vision.image_size,
                image_channels=vision.get("channels", 3))


def _validate_draw(c: ml_collections.ConfigDict, m: ModelConfig, tok) -> None:
  """The ``draw`` section against the model and data it would train with."""
  d = c.draw
  if not isinstance(d.enabled, bool):
    fail("draw.enabled", d.enabled, "must be True or False")
  if not d.enabled:
    return
  if m.vision is None:
    fail("draw.enabled", True, "needs a VLM (set model.vision): draw rows share batches "
         "with image rows, and the image tokenizer is trained on the training images")
  if c.data.task != "vqa" or c.data.name not in ("shapes", "image_text"):
    fail("draw.enabled", True, f"needs data with images and captions: data.task='vqa' and "
         f"data.name in ('shapes', 'image_text'), not task={c.data.task!r}, "
         f"name={c.data.name!r}")
  _number("draw.rows_fraction", d.rows_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
  _number("draw.uncond_prob", d.uncond_prob, lo=0, hi=1, hi_open=True)
  for key in ("steps", "batch_size"):
    _number(f"draw.codes.{key}", d.codes[key], lo=1, integer=True)
  _number("draw.eval_examples", d.eval_examples, lo=0, integer=True)
  _number("draw.samples", d.samples, lo=0, integer=True)
  _number("draw.temperature", d.temperature, lo=0)
  _number("draw.top_k", d.top_k, lo=0, integer=True)
  _number("draw.top_p", d.top_p, lo=0, hi=1, lo_open=True)
  _number("draw.cfg_scale", d.cfg_scale, lo=0)
  _number("draw.best_of", d.best_of, lo=1, integer=True)
  codes = image_codes_config(c)
  need = tok.vocab_size + codes.codebook_size + 1
  if m.vocab_size < need:
    fail("model.vocab_size", m.vocab_size, f"must be >= {need} with draw.enabled: text "
         f"vocab {tok.vocab_size} + codebook {codes.codebook_size} (draw.codes.levels="
         f"{codes.levels}) + 1 <img> id")
  n = codes.num_codes
  if c.data.target_len < n:
    fail("data.target_len", c.data.target_len, f"must be >= {n} with draw.enabled: a draw "
         f"row's target is draw.codes.grid^2 = {codes.grid}^2 = {n} image codes")
  row = c.data.prompt_len + c.data.target_len - 1
  if c.data.pack and c.data.packed_len < row:
    fail("data.packed_len", c.data.packed_len, f"must be >= data.prompt_len + "
         f"data.target_len - 1 = {row} with draw.enabled: a draw row is padded to "
         "packed_len as a row of its own")


def _build(cls, d: dict, section: str, **extra):
  """``cls(**d, **extra)``, every error naming the config key: a required field left None
  (``--config.model.dropout=None``) is reported as such instead of failing on a comparison
  inside ``__post_init__``, and the dataclass's own errors get the key appended."""
  for f in dataclasses.fields(cls):
    if f.name in d and d[f.name] is None and f.default is not None:
      fail(f"{section}.{f.name}", None, "must be set (it has no 'None' setting)")
  try:
    return cls(**d, **extra)
  except (TypeError, ValueError) as e:
    named = re.search(rf"{cls.__name__}\.(\w+)", str(e))
    key = f"config.{section}.{named.group(1)}" if named else f"config.{section}"
    raise type(e)(f"{e} ({key})") from e


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The frozen ``ModelConfig`` (validated by its own ``__post_init__``)."""
  d = c.model.to_dict()
  vision = d.pop("vision")
  if vision is not None:
    if vision.get("cnn_channels") is None:
      fail("model.vision.cnn_channels", None, "must be a tuple of channel counts")
    vision["cnn_channels"] = tuple(vision["cnn_channels"])
    vision = _build(VisionConfig, vision, "model.vision")
  return _build(ModelConfig, d, "model", vision=vision)


def _number(key: str, v, *, lo=None, hi=None, lo_open=False, hi_open=False,
            integer=False, none_ok=False) -> None:
  """``fail`` unless ``v`` is a (finite) number in the range (bools are not numbers here)."""
  if v is None and none_ok:
    return
  kinds = (int,) if integer else (int, float)
  if isinstance(v, bool) or not isinstance(v, kinds) or v != v or v in (float("inf"),
                                                                        float("-inf")):
    fail(key, v, f"must be {'an integer' if integer else 'a finite number'}"
         f"{' or None' if none_ok else ''}")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    fail(key, v, f"must be {'>' if lo_open else '>='} {lo}")
  if hi is not None and (v > hi or (hi_open and v == hi)):
    fail(key, v, f"must be {'<' if hi_open else '<='} {hi}")


def fail(key: str, value, allowed: str):
  """The one error format for a bad config value (every section, every layer uses it)."""
  raise ValueError(f"config.{key}={value!r} is invalid: {allowed}")


def tokenizer_for(c: ml_collections.ConfigDict):
  """The tokenizer a training config names (``data.tokenizer``: 'byte', 'shapes' or a
  tokenizer path; runs saved before the key existed used bytes). For a trained workdir use
  ``gptjax.train.load.load_run_tokenizer`` (the copy saved with the run)."""
  name = c.data.get("tokenizer", "byte")
  try:
    return make_tokenizer(name)
  except (ValueError, OSError) as e:  # a bad name or path, or an unreadable file
    fail("data.tokenizer", name, f"allowed values are {TOKENIZERS} or the path of a BPE / "
         f"SentencePiece tokenizer ({e})")


def validate(c: ml_collections.ConfigDict) -> ModelConfig:
  """Check the whole config once; returns the ModelConfig."""
  m = model_config(c)
  tok = tokenizer_for(c)
  if m.vocab_size < tok.vocab_size:
    fail("model.vocab_size", m.vocab_size,
          f"must be >= the data.tokenizer={c.data.get('tokenizer', 'byte')!r} tokenizer's "
          f"vocab_size={tok.vocab_size} "
          "(its tokens would index past the embedding table)")
  if c.data.task not in TASKS:
    fail("data.task", c.data.task, f"allowed values are {TASKS}")
  for key in ("train.steps", "train.batch_size", "optim.accum_steps", "train.log_every",
              "checkpoint.every", "checkpoint.keep", "eval.batch_size", "eval.max_batches"):
    sec, name = key.split(".")
    v = c[sec][name]
    if not isinstance(v, int) or v <= 0:
      fail(key, v, "must be a positive integer")
  policy = c.train.get("nonfinite", "stop")
  if policy not in NONFINITE_POLICIES:
    fail("train.nonfinite", policy, f"allowed values are {NONFINITE_POLICIES}")
  skipped = c.train.get("max_skipped", 10)
  if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 1:
    fail("train.max_skipped", skipped, "must be a positive integer (consecutive skipped steps)")
  if c.train.batch_size % c.optim.accum_steps:
    fail("train.batch_size", c.train.batch_size,
          f"must be divisible by optim.accum_steps={c.optim.accum_steps}")
  o = c.optim
  _number("optim.lr", o.lr, lo=0, lo_open=True)
  for key in ("b1", "b2"):
    _number(f"optim.{key}", o[key], lo=0, hi=1, hi_open=True)
  _number("optim.eps", o.eps, lo=0, lo_open=True)
  _number("optim.weight_decay", o.weight_decay, lo=0)
  _number("optim.end_lr_ratio", o.end_lr_ratio, lo=0)
  _number("optim.clip_norm", o.clip_norm, lo=0, none_ok=True)  # 0 / None: no clipping
  _number("optim.warmup_steps", o.warmup_steps, lo=0, integer=True)
  _number("seed", c.seed, integer=True)
  for key in ("prompt_len", "target_len", "packed_len", "seq_len"):
    _number(f"data.{key}", c.data[key], lo=1, integer=True)
  for key in ("decode_examples", "samples_to_print"):
    _number(f"eval.{key}", c.eval[key], lo=0, integer=True)
  _number("eval.retrieval_examples", c.eval.get("retrieval_examples", 0), lo=0, integer=True)
  if not isinstance(c.eval.get("retrieval", False), bool):
    fail("eval.retrieval", c.eval.retrieval, "must be True or False")
  w = c.train.get("contrastive_weight", 0.0)
  _number("train.contrastive_weight", w, lo=0)
  if w > 0:
    if m.vision is None or m.contrastive_dim == 0:
      fail("train.contrastive_weight", w, f"> 0 needs a VLM with a contrastive head: set "
           f"model.contrastive_dim > 0 (now {m.contrastive_dim}) and model.vision "
           f"(now {'set' if m.vision is not None else None}), or train.contrastive_weight=0")
    if c.data.task != "vqa":
      fail("train.contrastive_weight", w, f"> 0 needs data.task='vqa' (images with captions), "
           f"not {c.data.task!r}")
  if c.get("draw") is not None:
    _validate_draw(c, m, tok)
  _number("eval.every", c.eval.every, integer=True, none_ok=True)  # <= 0 / None: no eval
  _number("checkpoint.step", c.checkpoint.step, lo=0, integer=True, none_ok=True)
  for key in ("data", "fsdp", "tensor"):
    _number(f"mesh.{key}", c.mesh[key], lo=-1, integer=True)
    if c.mesh[key] == 0:
      fail(f"mesh.{key}", 0, "must be >= 1, or -1 (the devices the other two axes leave)")
  if [c.mesh[k] for k in ("data", "fsdp", "tensor")].count(-1) > 1:
    fail("mesh", c.mesh.to_dict(), "at most one of data / fsdp / tensor may be -1")
  if c.data.pack:
    if c.data.task != "vqa":
      fail("data.pack", True, "packing applies to data.task='vqa' ('lm' windows are already full)")
    if m.attention != "softmax":
      fail("data.pack", True, "packing needs model.attention='softmax' (linear attention keeps "
            "one running state per row and cannot isolate packed segments)")
  if c.data.task == "vqa":
    if m.vision is None and c.data.name == "shapes":
      fail("model.vision", None, "the 'shapes' data are images: set config.model.vision")
    rows = {"data.prompt_len + data.target_len - 1": c.data.prompt_len + c.data.target_len - 1}
    if c.data.pack:
      rows["data.packed_len"] = c.data.packed_len
    what, text = max(rows.items(), key=lambda kv: kv[1])
    if text > m.max_seq_len:
      fail("model.max_seq_len", m.max_seq_len,
           f"must be >= the text tokens of a row, {what} ({text}); image tokens "
           f"({m.num_image_tokens}) come on top")
  else:
    if c.data.seq_len > m.max_seq_len:
      fail("data.seq_len", c.data.seq_len, f"must be <= model.max_seq_len={m.max_seq_len} "
           "(data.task='lm' trains on windows of data.seq_len tokens)")
  return m


def eval_every(c) -> Optional[int]:
  return c.eval.every if c.eval.every and c.eval.every > 0 else None


def load_config_file(path: str, *args) -> ml_collections.ConfigDict:
  """``get_config(*args)`` of a ``configs/*.py`` file, e.g. for composing configs."""
  spec = importlib.util.spec_from_file_location(
      f"gptjax_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)
