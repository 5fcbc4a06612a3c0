"""A training config's data: its splits opened as sources and turned into batch pipelines.

The trainer, the compression recipe and the benchmarks all read data through these two
functions, so a config means the same batches everywhere.
"""
from __future__ import annotations

from gptjax.data.datasets import load_source
from gptjax.data.pipeline import Pipeline, make_pipeline
from gptjax.train.config import TEXT_FILES_KEYS, TOKENS_KEYS, tokenizer_for


def load_split(c, split: str):
  """The ``split`` of the config's dataset (``data.name``, builder kwargs, paths) as a
  random-access source."""
  d = c.data
  kwargs = dict(d.builder_kwargs.to_dict()) if d.builder_kwargs else {}
  own = {"text_files": TEXT_FILES_KEYS, "tokens": TOKENS_KEYS}.get(d.name)
  if own is not None:  # the shared text options: each builder takes its own keys
    kwargs = {k: v for k, v in kwargs.items() if k in own}
  if d.name == "text_files":
    if not d.paths:
      raise ValueError("config.data.paths is empty: data.name='text_files' needs files, globs "
                       "or directories (e.g. --config.data.paths='(\"notes/*.txt\",)')")
    kwargs["paths"] = list(d.paths)
  if d.name == "tokens":
    kwargs["paths"] = list(d.paths)
  if d.name == "image_text":
    if not d.paths or len(d.paths) != 1:
      raise ValueError(f"config.data.paths={tuple(d.paths or ())!r} is invalid: "
                       "data.name='image_text' needs one folder of images and captions.jsonl "
                       "/ captions.csv, e.g. --config.data.paths='(\"my_images\",)'")
    kwargs["paths"] = list(d.paths)
    if kwargs.get("image_size") is None and c.model.vision is not None:
      kwargs["image_size"] = c.model.vision.image_size  # stored at the size the encoder takes
  source = load_source(d.name, split, data_dir=d.data_dir, **kwargs)
  if d.name == "tokens":
    source.check_tokenizer(tokenizer_for(c))
  return source


def pipeline_for(c, source, *, train: bool, batch_size: int, seed_offset: int = 0) -> Pipeline:
  """Batches of ``source`` laid out for the config's task (``gptjax.batch``): shuffled,
  repeated and (``data.pack``) packed when ``train``; one ordered pass otherwise. Training
  rows carry their caption (``caption_ids``) when ``train.contrastive_weight`` > 0."""
  d = c.data
  captions = train and d.task == "vqa" and c.train.get("contrastive_weight", 0.0) > 0
  return make_pipeline(
      source, task=d.task, batch_size=batch_size, seed=c.seed + seed_offset, shuffle=train,
      repeat=train, prompt_len=d.prompt_len, target_len=d.target_len, seq_len=d.seq_len,
      text_key=d.text_key, name=f"{d.name}", drop_remainder=True,
      pack=bool(d.pack) and train, packed_len=d.packed_len,
      tokenizer=tokenizer_for(c), captions=captions)
