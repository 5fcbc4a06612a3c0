"""ImageText: a TFDS builder over a user's folder of images and captions, prepared without TF.

The folder layout, the captions file formats and the split rule are in ``folder.py``.

Images are decoded with Pillow (EXIF orientation applied), converted to RGB (transparent
pixels — RGBA, LA, palette or ``transparency`` images — are composited over white, so what
was invisible does not show), resized with bicubic filtering so that the SHORT side is
``image_size`` and centre-cropped to ``image_size x image_size`` (no resize when the short
side already matches), and stored as ``uint8`` ``tfds.features.Tensor``.

Records, one per image in validation/test and one per (image, caption) pair in train — so
every caption of a multi-caption image is trained on, as a caption task of its own:
``image``, ``file``, ``caption`` (the caption task's target: in train the pair's caption,
elsewhere the first), ``captions`` (all of them: the references for BLEU / CIDEr),
``caption_index``. If any image has QA pairs, also ``questions`` / ``answers`` of a fixed
length ``num_qa`` = the most pairs of any image (``gptjax.data.pipeline`` needs the same
number of tasks in every record) and ``qa_count`` (the image's real pairs). Shorter lists
are padded by repeating the image's own pairs; an image with none gets ``caption:`` ->
its captions in turn, i.e. more caption tasks. A folder without QA has no question keys,
so the pipeline makes caption tasks only.

Why the config name is a fingerprint: TFDS reuses data prepared under
``<data_dir>/image_text/<config name>/<version>``. The name hashes the folder's path, the
captions file's CONTENT (sha256), every image file's name, size and mtime and the options,
so an edited caption, an added / removed / rewritten image selects a fresh preparation
instead of stale data. (Image contents are not hashed: that would read every image at
every load.)

With ``skip_bad=True`` bad items (``folder.py``'s problems plus images Pillow cannot
decode) are left out, logged once at preparation and kept in
``builder.info.metadata['skipped']`` (``skipped_items(source)``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

from gptjax.data.builders.image_text import folder as fd
from gptjax.data.builders.shapes.shapes import _CUSTOM_CONFIG_FILTER

log = logging.getLogger("gptjax")
# Must equal gptjax.data.pipeline.CAPTION_PROMPT (tested): a builder does not import the
# pipeline that reads its records.
CAPTION_PROMPT = "caption:"


@dataclasses.dataclass(frozen=True)
class ImageTextConfig:
  """What a user chooses: the folder, the stored image size, split fractions, skip_bad."""

  folder: str
  image_size: int = 64
  train_fraction: float = 0.8
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  skip_bad: bool = False

  def __post_init__(self):
    object.__setattr__(self, "folder", os.path.abspath(os.path.expanduser(os.fspath(self.folder))))
    if not os.path.isdir(self.folder):
      raise ValueError(f"image_text folder={self.folder!r} is not a directory")
    s = self.image_size
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
      raise ValueError(f"image_text image_size={s!r} is invalid: must be a positive integer")
    fr = self.fractions
    if any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in fr):
      raise ValueError(f"image_text (train, validation, test)_fraction={fr!r} is invalid: "
                       "each must be a number in [0, 1]")
    if abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
      raise ValueError(f"image_text (train, validation, test)_fraction={fr!r} is invalid: "
                       "they must sum to 1, with train_fraction > 0")
    if not isinstance(self.skip_bad, bool):
      raise ValueError(f"image_text skip_bad={self.skip_bad!r} is invalid: must be True or False")

  @property
  def fractions(self) -> tuple[float, float, float]:
    return (self.train_fraction, self.validation_fraction, self.test_fraction)


@dataclasses.dataclass(eq=False)
class ImageTextBuilderConfig(tfds.core.BuilderConfig):
  """The TFDS config: the user's ``ImageTextConfig`` plus what scanning the folder found."""

  options: ImageTextConfig | None = None
  entries: tuple[fd.Entry, ...] = ()
  problems: tuple[fd.Problem, ...] = ()
  num_qa: int = 0

  @classmethod
  def make(cls, options: ImageTextConfig) -> "ImageTextBuilderConfig":
    entries, problems = fd.scan(options.folder, options.skip_bad)
    caps = fd.captions_path(options.folder)
    h = hashlib.sha256(repr((ImageText.VERSION, dataclasses.astuple(options))).encode())
    with open(caps, "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
    for name in sorted(set(fd.image_files(options.folder)) | {e.file for e in entries}):
      st = os.stat(os.path.join(options.folder, name))
      h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cls(
        name=f"folder_{h.hexdigest()[:16]}", version=ImageText.VERSION,
        description=f"{len(entries)} captioned image(s) in {options.folder}",
        options=options, entries=tuple(entries), problems=tuple(problems),
        num_qa=max((len(e.qa) for e in entries), default=0))


def _to_rgb(im: Image.Image) -> Image.Image:
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
    rgba = np.asarray(im.convert("RGBA"), np.uint32)
    a = rgba[..., 3:]
    # Over white, rounded to nearest: (x + 127) // 255 == round(x / 255) (no ties: 255 is odd).
    rgb = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")
  return im.convert("RGB")


def load_image(path: str, image_size: int) -> np.ndarray:
  """``path`` as a ``(image_size, image_size, 3)`` uint8 array (see the module docstring).

  Raises ``ValueError`` naming the file if Pillow cannot decode it.
  """
  try:
    with Image.open(path) as im:
      im.load()  # decode now: a truncated file fails here, not half-way through a resize
      im = _to_rgb(ImageOps.exif_transpose(im))
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb...
    raise ValueError(f"image_text: cannot read image {path!r}: {type(e).__name__}: {e}") from e
  w, h = im.size
  s = image_size
  if min(w, h) != s:
    size = (s, max(s, round(h * s / w))) if w <= h else (max(s, round(w * s / h)), s)
    im = im.resize(size, Image.Resampling.BICUBIC)
  arr = np.asarray(im, np.uint8)
  top, left = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
  return np.ascontiguousarray(arr[top:top + s, left:left + s])


def _padded_qa(e: fd.Entry, n: int) -> tuple[list[str], list[str]]:
  pairs = list(e.qa) or [(CAPTION_PROMPT, c) for c in e.captions]
  pairs = [pairs[i % len(pairs)] for i in range(n)]
  return [q for q, _ in pairs], [a for _, a in pairs]


class ImageText(tfds.core.GeneratorBasedBuilder):
  """Images + captions (+ QA) from a user's folder; needs an ``ImageTextBuilderConfig``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  # Why: TFDS's default ``code_path`` probes ``importlib_resources`` (a package that is not a
  # dependency) for builders defined in packages, and fails without it. The file is enough.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    s = c.options.image_size if isinstance(c, ImageTextBuilderConfig) and c.options else 1
    features = {
        "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
        "file": tfds.features.Text(),
        "caption": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "caption_index": tfds.features.Tensor(shape=(), dtype=np.int32),
    }
    if getattr(c, "num_qa", 0):
      features.update(
          questions=tfds.features.Sequence(tfds.features.Text(), length=c.num_qa),
          answers=tfds.features.Sequence(tfds.features.Text(), length=c.num_qa),
          qa_count=tfds.features.Tensor(shape=(), dtype=np.int32))
    return self.dataset_info_from_configs(
        description=__doc__, features=tfds.features.FeaturesDict(features),
        supervised_keys=None, homepage=None, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only; nothing is downloaded.
    c = self.builder_config
    if not isinstance(c, ImageTextBuilderConfig) or c.options is None:
      raise ValueError("ImageText needs config=ImageTextBuilderConfig.make(ImageTextConfig(folder))")
    o = c.options
    problems = fd.Problems(o.folder, o.skip_bad)
    problems.items = list(c.problems)
    good = []
    # Decoded once here to find the bad images before any split is written, and again while
    # writing: holding every decoded image in memory would not scale.
    for e in c.entries:
      try:
        load_image(os.path.join(o.folder, e.file), o.image_size)
        good.append(e)
      except ValueError as err:
        problems.add(e.file, f"unreadable or corrupt image ({err.__cause__ or err})")
    splits = fd.assign_splits(good, o.fractions)
    for s, f in zip(fd.SPLITS, o.fractions):
      if f > 0 and not splits[s]:
        counts = {k: len(v) for k, v in splits.items()}
        raise ValueError(
            f"image_text folder {o.folder!r}: split {s!r} is empty ({len(good)} usable "
            f"image(s), per split {counts}): add images, give some lines \"split\": \"{s}\", "
            f"or set {s}_fraction=0 (then that split is absent)")
    skipped = [p.as_dict() for p in problems.items]
    self.info.metadata["skipped"] = skipped
    self.info.metadata["num_skipped"] = len(skipped)
    self.info.metadata["images"] = {s: len(v) for s, v in splits.items()}
    if skipped:
      log.warning("image_text: skipped %d bad item(s) in %s (skip_bad=True): %s%s", len(skipped),
                  o.folder, "; ".join(f"{p['item']}: {p['problem']}" for p in skipped[:5]),
                  " ..." if len(skipped) > 5 else "")
    # TFDS refuses to write an empty split, so one with no image is left out.
    return {s: self._generate_examples(v, s == "train") for s, v in splits.items() if v}

  def _generate_examples(self, entries: Sequence[fd.Entry], per_caption: bool):
    c = self.builder_config
    for e in entries:
      image = load_image(os.path.join(c.options.folder, e.file), c.options.image_size)
      qa = {}
      if c.num_qa:
        q, a = _padded_qa(e, c.num_qa)
        qa = {"questions": q, "answers": a, "qa_count": np.int32(len(e.qa))}
      for k in range(len(e.captions) if per_caption else 1):
        yield f"{e.file}#{k}", {"image": image, "file": e.file, "caption": e.captions[k],
                                "captions": list(e.captions), "caption_index": np.int32(k),
                                **qa}


OPTIONS = tuple(f.name for f in dataclasses.fields(ImageTextConfig) if f.name != "folder")


def image_text_builder(folder: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                       **kwargs) -> ImageText:
  """The builder (not prepared) of ``folder``; ``kwargs``: any of ``OPTIONS``."""
  unknown = sorted(set(kwargs) - set(OPTIONS))
  if unknown:
    raise ValueError(f"image_text: unknown argument(s) {unknown}; allowed: {OPTIONS}")
  config = ImageTextBuilderConfig.make(ImageTextConfig(os.fspath(folder), **kwargs))
  absl_logger = logging.getLogger("absl")
  if _CUSTOM_CONFIG_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_CUSTOM_CONFIG_FILTER)
  return ImageText(config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                   file_format="array_record")


def load_image_text(folder: str | os.PathLike, split: str,
                    data_dir: str | os.PathLike | None = None, **kwargs):
  """Prepares (once per folder fingerprint) and returns ``as_data_source(split)``.

  Records are dicts of NumPy arrays; text fields come back as ``bytes`` and the stored order
  is shuffled by key. ``kwargs``: ``image_size`` (default 64), ``train_fraction`` /
  ``validation_fraction`` / ``test_fraction`` (0.8 / 0.1 / 0.1), ``skip_bad`` (False).
  """
  builder = image_text_builder(folder, data_dir, **kwargs)
  builder.download_and_prepare()
  if split not in builder.info.splits:
    raise ValueError(f"image_text: split {split!r} is empty or unknown for "
                     f"{builder.builder_config.options.folder!r} (available: "
                     f"{sorted(builder.info.splits)}); allowed names are {fd.SPLITS}")
  return builder.as_data_source(split=split)


def skipped_items(source_or_builder) -> list[dict]:
  """The items ``skip_bad`` left out (``{'item', 'problem'}`` each) of a prepared folder:
  pass the builder or a source ``load_image_text`` returned."""
  info = getattr(source_or_builder, "dataset_info", None) or source_or_builder.info
  return list(info.metadata.get("skipped", []))
