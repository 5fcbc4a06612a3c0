"""One entry point for random-access data sources: built-in builders or prepared TFDS data.

``load_source`` never downloads. The built-in ``shapes``, ``text_files`` and ``image_text``
are generated locally (prepared on first use). Any other name must already be prepared in
``array_record`` format under ``data_dir``, because preparing most TFDS datasets needs
TensorFlow and network, which this library does not assume.
"""
from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from gptjax.data.builders import load_shapes, load_text_files
from gptjax.data.builders.image_text import load_image_text
from gptjax.data.tokens import TokenFile

BUILTIN = ("shapes", "text_files", "tokens", "image_text")
_MAX_CAUSE_CHARS = 600  # tfds's "not found" message lists every dataset; keep ours readable.


def _short(e: BaseException) -> str:
  msg = f"{type(e).__name__}: {e}"
  return msg if len(msg) <= _MAX_CAUSE_CHARS else msg[:_MAX_CAUSE_CHARS] + " ..."


def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None, **kwargs: Any):
  """A random-access source (``len`` and ``[i]``) of dict records for ``name``/``split``.

  ``"shapes"``: ``kwargs`` go to ``load_shapes`` (``image_size``, ``train_size``, ...).
  ``"text_files"``: needs ``paths=`` (files, globs or directories); other ``kwargs`` go to
  ``load_text_files``. ``"image_text"``: ``paths=[FOLDER]`` of images + a captions file;
  other ``kwargs`` (``image_size``, ``*_fraction``, ``skip_bad``) go to ``load_image_text``.
  ``"tokens"``: ``paths=[DIR]`` of ``gptjax.data.tokens`` output (a
  ``TokenFile``; ``windows=`` 'fixed' | 'random'). Anything else: ``tfds.builder(name, data_dir=data_dir, **kwargs)``
  on data already prepared as ``array_record``.

  Raises ``ValueError`` (dataset unknown or not prepared) or ``RuntimeError`` (present but
  unreadable here) naming the dataset, the cause and the fix, chained to the original.
  """
  if name == "shapes":
    return load_shapes(split, data_dir=data_dir, **kwargs)
  if name == "tokens":
    paths = list(kwargs.pop("paths", ()))
    if len(paths) != 1:
      raise ValueError(f"data.name='tokens' needs data.paths=(DIR,): one pre-tokenised "
                       f"directory, got {paths!r}")
    return TokenFile(os.path.expanduser(paths[0]), split, **kwargs)
  if name == "text_files":
    if "paths" not in kwargs:
      raise ValueError("load_source('text_files', ...) needs paths=[file, glob or directory, ...]")
    paths = kwargs.pop("paths")
    return load_text_files(paths, split, data_dir=data_dir, **kwargs)
  if name == "image_text":
    paths = list(kwargs.pop("paths", ()))
    if len(paths) != 1:
      raise ValueError(f"load_source('image_text', ...) needs paths=[FOLDER]: one folder of "
                       f"images and captions.jsonl / captions.csv, got {paths!r}")
    return load_image_text(paths[0], split, data_dir=data_dir, **kwargs)

  where = f"data_dir={os.fspath(data_dir)!r}" if data_dir is not None else "the default data_dir (~/tensorflow_datasets)"
  fix = (
      f"Prepare it on a machine with TensorFlow and network access with "
      f"`tfds build {name} --file_format=array_record --data_dir=DIR`, copy DIR here and pass "
      f"data_dir=DIR; or use one of the built-in datasets {list(BUILTIN)}."
  )
  try:
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir), **kwargs)
  except Exception as e:
    raise ValueError(
        f"Dataset {name!r} is not available: tfds could not create its builder "
        f"(unknown name, or its module needs TensorFlow or other missing packages). "
        f"Cause: {_short(e)}. {fix}"
    ) from e
  if not builder.is_prepared():
    # Checked here because as_data_source's own message for this case is misleading.
    raise ValueError(
        f"Dataset {name!r} is not prepared in {where} (looked in {builder.data_dir}); "
        f"gptjax never downloads implicitly. {fix}"
    )
  try:
    return builder.as_data_source(split=split)
  except Exception as e:
    raise RuntimeError(
        f"Dataset {name!r} (split {split!r}) in {builder.data_dir} cannot be read as a random-access "
        f"source. Cause: {_short(e)}. Check the split name; data prepared in another file format "
        f"must be re-prepared with --file_format=array_record. {fix}"
    ) from e
