"""TextFiles: a TFDS builder over local UTF-8 text files, prepared without TensorFlow.

Documents: by default each file is split on blank lines (lines holding only whitespace
count as blank) and every non-empty paragraph, stripped of surrounding whitespace, is one
document; with ``split_on_blank_lines=False`` each whole file is one document (kept
verbatim, newlines normalised to ``\\n``). Documents are numbered in order: files sorted by
absolute path, then by position in the file.

Splits: document ``i`` goes to ``validation`` when ``sha256(str(i))`` (as a fraction of
2**64) is below ``validation_fraction`` (default 5%), else to ``train``. With 2 or more
documents each split gets at least one (even at fraction 0; with a single document there is
only ``train``). Deterministic, and independent of the file text.

Why the config name is a fingerprint: TFDS reuses prepared data found under
``<data_dir>/text_files/<config name>/<version>``. The name hashes the resolved paths,
their sizes and mtimes and the options, so editing, adding or removing a file selects a
fresh config instead of silently reading stale data.

All documents are held in memory while preparing; fine for the small corpora this is for.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SPLIT_MODES = ("documents", "tail")


def resolve_paths(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[str, ...]:
  """Files named by paths, glob patterns (``**`` allowed) or directories (all files below).

  Returns sorted, de-duplicated absolute paths. Raises ``ValueError`` naming every
  pattern that matched no file, so a typo is not silently ignored.
  """
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  patterns = [os.path.expanduser(os.fspath(p)) for p in patterns]
  if not patterns:
    raise ValueError("text_files: no paths or patterns given")
  found: set[str] = set()
  unmatched = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      matches = [
          os.path.join(root, f) for root, _, files in os.walk(pattern) for f in files
      ]
    else:
      matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    if not matches:
      unmatched.append(pattern)
    found.update(os.path.abspath(m) for m in matches)
  if unmatched:
    raise ValueError(f"text_files: no file matches {unmatched!r} (of patterns {patterns!r})")
  return tuple(sorted(found))


def split_documents(text: str, document_separator: str = "") -> list[str]:
  """One file's text as documents, verbatim (see the module docstring)."""
  pieces = text.split(document_separator) if document_separator else [text]
  return [p for p in pieces if p]


def assign_splits(num_docs: int, validation_fraction: float) -> np.ndarray:
  """Boolean array, True where document ``i`` is in validation (see module docstring)."""
  h = np.array(
      [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") for i in range(num_docs)],
      dtype=np.float64,
  ) / 2.0**64
  is_val = h < validation_fraction
  if num_docs >= 2:
    if not is_val.any():
      is_val[int(np.argmin(h))] = True
    if is_val.all():
      is_val[int(np.argmax(h))] = False
  return is_val


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """Resolved files and options; build it with ``TextFilesConfig.make``."""

  paths: tuple[str, ...] = ()
  validation_fraction: float = 0.05
  document_separator: str = ""
  split_mode: str = "documents"

  @classmethod
  def make(cls, patterns, validation_fraction: float = 0.05, document_separator: str = "",
           split_mode: str = "documents") -> "TextFilesConfig":
    """Resolves ``patterns`` now and names the config by a fingerprint of the file set."""
    if not 0.0 <= validation_fraction < 1.0:
      raise ValueError(f"text_files validation_fraction={validation_fraction!r} is invalid: "
                       "must be in [0, 1)")
    if not isinstance(document_separator, str):
      raise ValueError(f"text_files document_separator={document_separator!r} is invalid: "
                       "must be a string ('' keeps every file whole)")
    if split_mode not in SPLIT_MODES:
      raise ValueError(f"text_files split_mode={split_mode!r} is invalid: allowed values are "
                       f"{SPLIT_MODES}")
    paths = resolve_paths(patterns)
    h = hashlib.sha256()
    h.update(repr((float(validation_fraction), document_separator, split_mode)).encode())
    for p in paths:
      st = os.stat(p)
      h.update(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cls(
        name=f"files_{h.hexdigest()[:16]}",
        version=TextFiles.VERSION,
        description=f"{len(paths)} file(s): {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}",
        paths=paths,
        validation_fraction=float(validation_fraction),
        document_separator=document_separator,
        split_mode=split_mode,
    )


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Documents from local text files; needs a ``TextFilesConfig`` (no default config)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "2.0.0": "Verbatim text: whole files (or document_separator), no stripping, "
                            "no newline normalisation; split_mode 'tail'."}

  # Why: TFDS's default ``code_path`` probes ``importlib_resources`` (a package that is not a
  # dependency) for builders defined in packages, and fails without it. The file is enough.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),  # absolute path of the file
            "doc_index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=None,
        homepage=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only; nothing is downloaded.
    c = self.builder_config
    if not isinstance(c, TextFilesConfig) or not c.paths:
      raise ValueError("TextFiles needs config=TextFilesConfig.make(patterns)")
    docs = []
    for path in c.paths:
      try:
        # newline="": the characters as they are on disk (CRLF stays CRLF).
        with open(path, encoding="utf-8", newline="") as f:
          text = f.read()
      except UnicodeDecodeError as e:
        raise ValueError(f"text_files: {path} is not valid UTF-8: {e}") from e
      docs.extend((path, d) for d in split_documents(text, c.document_separator))
    if not docs:
      raise ValueError(f"text_files: no non-empty document in {list(c.paths)!r}")
    if c.split_mode == "tail":
      cut = [len(d) - int(round(len(d) * c.validation_fraction)) for _, d in docs]
      parts = {"train": [(p, d[:k]) for (p, d), k in zip(docs, cut)],
               "validation": [(p, d[k:]) for (p, d), k in zip(docs, cut)]}
      return {name: self._generate_examples(ds, [i for i, (_, d) in enumerate(ds) if d])
              for name, ds in parts.items() if any(d for _, d in ds)}
    is_val = assign_splits(len(docs), c.validation_fraction)
    splits = {"train": np.flatnonzero(~is_val), "validation": np.flatnonzero(is_val)}
    # TFDS refuses to write an empty split, so one with no document is left out.
    return {name: self._generate_examples(docs, idx) for name, idx in splits.items() if len(idx)}

  def _generate_examples(self, docs, indices):
    for i in indices:
      path, text = docs[i]
      yield int(i), {"text": text, "source": path, "doc_index": np.int64(i)}


def text_files_builder(
    paths,
    data_dir: str | os.PathLike | None = None,
    *,
    validation_fraction: float = 0.05,
    document_separator: str = "",
    split_mode: str = "documents",
) -> TextFiles:
  """The builder (not prepared) for the files named by ``paths`` (paths/globs/dirs)."""
  config = TextFilesConfig.make(paths, validation_fraction, document_separator, split_mode)
  return TextFiles(
      config=config,
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format="array_record",
  )


def load_text_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    split: str,
    data_dir: str | os.PathLike | None = None,
    **kwargs,
):
  """Prepares (once per file-set fingerprint) and returns ``as_data_source(split)``.

  Records are dicts with ``text`` and ``source`` as ``bytes`` and ``doc_index``; stored
  order is shuffled by key. ``kwargs``: ``validation_fraction``, ``document_separator``,
  ``split_mode`` (see the module docstring).
  """
  builder = text_files_builder(paths, data_dir, **kwargs)
  builder.download_and_prepare()
  if split not in builder.info.splits:
    raise ValueError(
        f"text_files: split {split!r} is empty or unknown for {list(builder.builder_config.paths)!r}"
        f" (available: {sorted(builder.info.splits)}); a split needs at least one document"
    )
  return builder.as_data_source(split=split)
