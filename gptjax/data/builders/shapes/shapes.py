"""Shapes: a procedurally generated image + caption + QA dataset, prepared without TF.

Each example is a small RGB image (default 32x32) on a black background with 1-3
non-overlapping shapes (square / circle / triangle) in colours from a fixed palette. The
caption and the question answers are derived deterministically from the drawing
parameters, which are stored alongside, so a model can learn them exactly and tests can
verify them independently.

Why NumPy rasterisation (no PIL) and ``tfds.features.Tensor`` (no ``Image``): both keep
preparation and reading free of TensorFlow; ``Image`` would need TF for PNG encoding.

Generation is a pure function of ``(seed, split, index)`` (one RNG per example), so the
prepared bytes are identical across runs and machines, and the splits differ because each
split feeds its own id into the seed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

KINDS = ("square", "circle", "triangle")
KIND_PLURALS = ("squares", "circles", "triangles")
COLOR_NAMES = ("red", "green", "blue", "yellow", "white", "purple")
# Pure, well separated colours; none is black, the background.
PALETTE = np.array(
    [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (255, 255, 255),
        (160, 32, 240),
    ],
    dtype=np.uint8,
)
QUESTION_TYPES = ("color", "count", "spatial")
MAX_SHAPES = 3
NUM_QA = 3
PAD = -1  # fills the drawing-parameter arrays past ``num_shapes``.
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

_MAX_TRIES = 200


def shape_radii(image_size: int) -> tuple[int, ...]:
  """Half-extents used for an image size; (3, 4, 5, 6) at 32 px."""
  return tuple(sorted({max(2, round(image_size * f)) for f in (0.1, 0.125, 0.16, 0.2)}))


def shape_mask(kind: int, x: int, y: int, r: int, image_size: int) -> np.ndarray:
  """Boolean HxW mask of one shape centred at column ``x``, row ``y``, half-extent ``r``.

  Every shape lies inside its box ``[x-r, x+r] x [y-r, y+r]`` and covers its centre.
  The triangle points up: apex at ``(x, y-r)``, base on row ``y+r`` from ``x-r`` to ``x+r``.
  """
  rows, cols = np.ogrid[:image_size, :image_size]
  dx, dy = cols - x, rows - y
  if KINDS[kind] == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if KINDS[kind] == "circle":
    return dx * dx + dy * dy <= r * r
  if KINDS[kind] == "triangle":
    return (np.abs(dy) <= r) & (2 * np.abs(dx) <= dy + r)
  raise ValueError(f"unknown kind {kind}")


def _place(rng: np.random.Generator, image_size: int, n: int):
  """Samples ``n`` shapes whose boxes are 1 px apart and whose centre columns differ.

  Distinct columns make "left of" and the left-to-right caption order unambiguous.
  Overlapping placements are rejected and resampled.
  """
  radii = shape_radii(image_size)
  while True:  # Restart the whole example if one shape cannot be placed.
    placed: list[tuple[int, int, int, int, int]] = []
    for _ in range(n):
      for _ in range(_MAX_TRIES):
        kind = int(rng.integers(len(KINDS)))
        color = int(rng.integers(len(COLOR_NAMES)))
        r = int(radii[rng.integers(len(radii))])
        x = int(rng.integers(r, image_size - r))
        y = int(rng.integers(r, image_size - r))
        if all(
            x != px and (abs(x - px) >= r + pr + 2 or abs(y - py) >= r + pr + 2)
            for _, _, px, py, pr in placed
        ):
          placed.append((kind, color, x, y, r))
          break
      else:
        break
    if len(placed) == n:
      return sorted(placed, key=lambda s: s[2])  # left to right


def vocabulary() -> tuple[str, ...]:
  """The words of the captions, questions and answers (for ``WordTokenizer``), in a fixed
  order so token ids are stable. Plurals are left out on purpose: "circles" is then tokenized
  as "circle" + "s", so a count question names the shape with the caption's own token."""
  fixed = ("a", "and", "what", "color", "is", "the", "how", "many", "left", "of", "yes", "no",
           "caption")
  return fixed + KINDS + COLOR_NAMES


def caption_for(kinds, colors) -> str:
  """"a red square", "a red square and a blue circle", "a, b and c" (left to right)."""
  parts = [f"a {COLOR_NAMES[c]} {KINDS[k]}" for k, c in zip(kinds, colors)]
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def _qa_candidates(kinds, colors, xs) -> dict[str, list[tuple[str, str]]]:
  counts = [list(kinds).count(k) for k in range(len(KINDS))]
  where = {k: i for i, k in enumerate(kinds) if counts[k] == 1}  # kinds seen exactly once
  color = [(f"what color is the {KINDS[k]}?", COLOR_NAMES[colors[i]]) for k, i in where.items()]
  count = [(f"how many {KIND_PLURALS[k]}?", str(counts[k])) for k in range(len(KINDS))]
  spatial = [
      (f"is the {KINDS[a]} left of the {KINDS[b]}?", "yes" if xs[ia] < xs[ib] else "no")
      for a, ia in where.items()
      for b, ib in where.items()
      if a != b
  ]
  return {"color": color, "count": count, "spatial": spatial}


def _pick_questions(rng: np.random.Generator, cands) -> list[tuple[int, str, str]]:
  """NUM_QA distinct questions, cycling through the types in a random order.

  A type with no candidate left is skipped; counts (always 3 candidates) fill the rest.
  """
  cands = {t: list(v) for t, v in cands.items()}
  order = [QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))]
  out = []
  slot = 0
  while len(out) < NUM_QA:
    t = order[slot % len(order)]
    slot += 1
    if cands[t]:
      q, a = cands[t].pop(int(rng.integers(len(cands[t]))))
      out.append((QUESTION_TYPES.index(t), q, a))
  return out


def generate_example(seed: int, split_id: int, index: int, image_size: int = 32) -> dict[str, Any]:
  """One example as a dict of NumPy values / str, a pure function of its arguments."""
  rng = np.random.default_rng([seed, split_id, index])
  n = int(rng.integers(1, MAX_SHAPES + 1))
  shapes = _place(rng, image_size, n)
  image = np.zeros((image_size, image_size, 3), np.uint8)
  for kind, color, x, y, r in shapes:
    image[shape_mask(kind, x, y, r, image_size)] = PALETTE[color]
  kinds, colors, xs, ys, sizes = (np.full(MAX_SHAPES, PAD, np.int32) for _ in range(5))
  for i, s in enumerate(shapes):
    kinds[i], colors[i], xs[i], ys[i], sizes[i] = s
  qa = _pick_questions(rng, _qa_candidates(kinds[:n].tolist(), colors[:n].tolist(), xs[:n].tolist()))
  return {
      "image": image,
      "caption": caption_for(kinds[:n], colors[:n]),
      "questions": [q for _, q, _ in qa],
      "answers": [a for _, _, a in qa],
      "question_types": [t for t, _, _ in qa],
      "num_shapes": np.int32(n),
      "kinds": kinds,
      "colors": colors,
      "xs": xs,
      "ys": ys,
      "sizes": sizes,
  }


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed. The config name must encode them (see ``make``)."""

  image_size: int = 32
  train_size: int = 10_000
  validation_size: int = 500
  test_size: int = 500
  seed: int = 0

  @classmethod
  def make(cls, **kwargs) -> "ShapesConfig":
    """A config whose name is derived from its parameters.

    Why: TFDS stores prepared data under ``<data_dir>/shapes/<config name>/<version>``;
    if two parameter sets shared a name, stale data from one would be read for the other.
    """
    cfg = cls(name="_", version=Shapes.VERSION, **kwargs)
    if cfg.image_size < 16:
      raise ValueError(f"image_size must be >= 16 so that 3 shapes fit, got {cfg.image_size}")
    if min(cfg.train_size, cfg.validation_size, cfg.test_size) < 0:
      raise ValueError("split sizes must be >= 0")
    cfg.name = (
        f"s{cfg.image_size}_tr{cfg.train_size}_va{cfg.validation_size}"
        f"_te{cfg.test_size}_seed{cfg.seed}"
    )
    return cfg


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured squares/circles/triangles with captions and QA. See the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", version=VERSION, description="32x32, 10000/500/500, seed 0"),
  ]
  DEFAULT_CONFIG_NAME = "default"

  # Why: TFDS's default ``code_path`` probes ``importlib_resources`` (a package that is not a
  # dependency) for builders defined in packages, and fails without it. The file is enough.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    vec = lambda: tfds.features.Tensor(shape=(MAX_SHAPES,), dtype=np.int32)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "questions": tfds.features.Sequence(tfds.features.Text(), length=NUM_QA),
            "answers": tfds.features.Sequence(tfds.features.Text(), length=NUM_QA),
            "question_types": tfds.features.Sequence(
                tfds.features.ClassLabel(names=QUESTION_TYPES), length=NUM_QA
            ),
            "num_shapes": tfds.features.Tensor(shape=(), dtype=np.int32),
            "kinds": vec(),
            "colors": vec(),
            "xs": vec(),
            "ys": vec(),
            "sizes": vec(),
        }),
        supervised_keys=None,
        homepage=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    sizes = {"train": c.train_size, "validation": c.validation_size, "test": c.test_size}
    # TFDS refuses to write an empty split, so a split of size 0 is left out.
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    for i in range(num):
      yield i, generate_example(c.seed, SPLIT_IDS[split], i, c.image_size)


class _DropCustomConfigWarning(logging.Filter):
  """TFDS warns "Using custom data configuration" whenever a builder gets a config object
  rather than a registered name. Shapes derives its config from the split sizes on purpose
  (the name encodes them), so at every load that warning is noise in the user's log."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


_CUSTOM_CONFIG_FILTER = _DropCustomConfigWarning()


def shapes_builder(data_dir: str | os.PathLike | None = None, **config_kwargs) -> Shapes:
  """The builder (not prepared). Non-default ``config_kwargs`` select a derived config."""
  params = ("image_size", "train_size", "validation_size", "test_size", "seed")
  defaults = {f.name: f.default for f in dataclasses.fields(ShapesConfig) if f.name in params}
  unknown = set(config_kwargs) - set(defaults)
  if unknown:
    raise TypeError(f"unknown Shapes config arguments: {sorted(unknown)}; known: {sorted(defaults)}")
  custom = any(config_kwargs[k] != defaults[k] for k in config_kwargs)
  config = ShapesConfig.make(**config_kwargs) if custom else "default"
  absl_logger = logging.getLogger("absl")
  if _CUSTOM_CONFIG_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_CUSTOM_CONFIG_FILTER)
  return Shapes(
      config=config,
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format="array_record",
  )


def load_shapes(split: str, data_dir: str | os.PathLike | None = None, **config_kwargs):
  """Prepares (once) and returns ``builder.as_data_source(split=split)``.

  ``data_dir`` defaults to the TFDS default (``~/tensorflow_datasets``). ``config_kwargs``
  (``image_size``, ``train_size``, ``validation_size``, ``test_size``, ``seed``) pick a
  config; tests use small split sizes. Records come back as dicts of NumPy arrays; text
  fields are ``bytes`` and stored order is shuffled by key (not by generation index).
  """
  builder = shapes_builder(data_dir, **config_kwargs)
  builder.download_and_prepare()
  return builder.as_data_source(split=split)
