"""Model configuration: frozen dataclasses, validated once at construction.

A bad value raises ``ValueError`` naming the field, the value and what is allowed, so a
typo in a config file fails at start-up rather than as a shape error deep inside jit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


ATTENTION_KINDS = ("softmax", "linear")
MLP_ACTIVATIONS = ("gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")
POSITION_KINDS = ("learned", "rope")
VISION_KINDS = ("cnn", "vit")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "pallas")
REMAT_POLICIES = ("none", "full", "dots")
# Before remat was a policy name it was a bool: saved configs and command-line flags
# (``--config.model.remat=True`` arrives as a string once the field is a str) still mean
# the same thing.
_REMAT_LEGACY = {True: "full", False: "none", "True": "full", "False": "none",
                 "true": "full", "false": "none"}


def _fail(cls: str, field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"{cls}.{field}={value!r} is invalid: {allowed}")


def _check_choice(cls: str, field: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    _fail(cls, field, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_positive(cls: str, field: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(cls, field, value, "must be a positive integer")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Vision encoder: image (B, H, W, C) -> (B, P, D_v) tokens.

  ``cnn``: one conv3x3 -> ReLU per entry of ``cnn_channels``; the first ``cnn_pools`` of
  them (default: all) are followed by a 2x2 max-pool (the CNN of the original GPT-4V
  sketch, generalised), then a 1x1 conv to ``width``; the final
  (image_size / 2**cnn_pools)**2 grid cells are the image tokens. Convs after the last
  pool widen each token's receptive field (by 2**cnn_pools px per side each) at low cost.
  ``vit``: non-overlapping ``patch_size`` patches -> linear embedding + learned positions ->
  ``depth`` bidirectional transformer blocks of ``width`` and ``num_heads``.
  """

  kind: str = "cnn"
  image_size: int = 32
  channels: int = 3
  patch_size: int = 4  # vit only
  width: int = 64  # D_v: width of the encoder's output tokens
  depth: int = 2  # vit blocks
  num_heads: int = 4  # vit
  mlp_dim: int = 128  # vit
  cnn_channels: tuple[int, ...] = (32, 64)  # cnn convs (output channels), in order
  cnn_pools: Optional[int] = None  # the first k convs are followed by a 2x2 max-pool; None: all
  global_token: bool = False  # append the max over all grid tokens as one more image token
  cnn_pos_embed: bool = False  # cnn: add fixed 2-D sin-cos positions (x, y) to the grid tokens

  def __post_init__(self):
    c = "VisionConfig"
    _check_choice(c, "kind", self.kind, VISION_KINDS)
    for f in ("image_size", "channels", "patch_size", "width", "depth", "num_heads", "mlp_dim"):
      _check_positive(c, f, getattr(self, f))
    if not isinstance(self.cnn_channels, tuple) or not self.cnn_channels:
      _fail(c, "cnn_channels", self.cnn_channels, "must be a non-empty tuple of positive ints")
    for ch in self.cnn_channels:
      _check_positive(c, "cnn_channels", ch)
    if self.cnn_pools is not None and (
        not isinstance(self.cnn_pools, int) or isinstance(self.cnn_pools, bool)
        or not 0 <= self.cnn_pools <= len(self.cnn_channels)):
      _fail(c, "cnn_pools", self.cnn_pools,
            f"must be None or an int in [0, len(cnn_channels)={len(self.cnn_channels)}]")
    if self.kind == "cnn" and self.cnn_pos_embed and self.width % 4:
      _fail(c, "width", self.width, "must be divisible by 4 with cnn_pos_embed=True "
            "(sin and cos of x and y)")
    if self.kind == "vit":
      if self.image_size % self.patch_size:
        _fail(c, "image_size", self.image_size,
              f"must be divisible by patch_size={self.patch_size}")
      if self.width % self.num_heads:
        _fail(c, "width", self.width, f"must be divisible by num_heads={self.num_heads}")
    else:
      stride = 2 ** self.num_pools
      if self.image_size % stride:
        _fail(c, "image_size", self.image_size,
              f"must be divisible by 2**cnn_pools={stride} for the cnn encoder")

  @property
  def num_pools(self) -> int:
    """How many of the cnn convs are followed by a 2x2 max-pool."""
    return len(self.cnn_channels) if self.cnn_pools is None else self.cnn_pools

  @property
  def grid_size(self) -> int:
    if self.kind == "vit":
      return self.image_size // self.patch_size
    return self.image_size // 2 ** self.num_pools

  @property
  def num_tokens(self) -> int:
    """P: number of image tokens the encoder emits (the grid, + 1 with ``global_token``)."""
    return self.grid_size**2 + int(self.global_token)


# The byte tokenizer's vocabulary: 256 bytes + <pad>, <bos>, <eos>, <sep> (a test checks it
# equals gptjax.data.tokenizers.ByteTokenizer.vocab_size; the model floor does not import data).
BYTE_VOCAB_SIZE = 260

# Sizes that default to a value derived from others: ``None`` at construction resolves to
# ``_DERIVED[name](config)``, so after construction each holds its int.
_DERIVED = {
    "num_kv_heads": lambda c: c.num_heads,
    "head_dim": lambda c: c.width // c.num_heads,
    "mlp_dim": lambda c: 4 * c.width,
    "num_unique_layers": lambda c: c.depth,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder-only transformer, and optionally its vision encoder (``vision``).

  ``max_seq_len`` bounds the *text*: a VLM sizes its position table and decode caches for
  its image tokens plus ``max_seq_len`` text tokens itself (``max_total_len``), so adding a
  vision encoder to a preset never makes the text budget disappear.

  ``num_kv_heads``, ``head_dim``, ``mlp_dim`` and ``num_unique_layers`` may be given as
  ``None`` and are then derived (num_heads, width // num_heads, 4 * width, depth) once, at
  construction. Use ``cfg.replace(...)`` to change a config: it derives those again from
  the new sizes unless they were set to something else. (``dataclasses.replace`` copies
  the derived values as they are.)
  """

  vocab_size: int = BYTE_VOCAB_SIZE
  max_seq_len: int = 128  # T_max: text tokens (image tokens come on top, see max_total_len)
  width: int = 64  # D
  depth: int = 2  # number of layers applied
  num_heads: int = 4  # N
  num_kv_heads: Optional[int] = None  # K (GQA); None: = num_heads
  head_dim: Optional[int] = None  # H; None: width // num_heads (head pruning sets it)
  mlp_dim: Optional[int] = None  # F; None: 4 * width
  mlp_activation: str = "gelu"
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  position: str = "learned"
  rope_theta: float = 10_000.0
  dropout: float = 0.0
  tie_embeddings: bool = True
  attention: str = "softmax"
  attention_impl: str = "auto"  # softmax backend: auto picks per platform
  linear_chunk_size: int = 64
  num_unique_layers: Optional[int] = None  # u <= depth: layer i uses block i mod u
  dtype: str = "float32"  # activations / compute (a dtype name JAX accepts as a dtype)
  param_dtype: str = "float32"  # parameters
  # Recompute blocks in the backward pass (activation memory): 'none'; 'full' (keep only
  # each block's input); 'dots' (keep the matmul outputs, recompute the cheap rest).
  # Booleans are accepted as before (True: 'full', False: 'none').
  remat: str = "none"
  # Apply the layers with one jax.lax.scan (training / eval forward) over blocks stored
  # stacked (one array per parameter kind, leading `layers` axis; see gptjax.layout): XLA
  # sees one block body and the optimizer one array per kind instead of `depth` copies, so
  # compile time stays flat in depth. Checkpoints of either layout restore into the other;
  # decoding loops over slices of the stack. Off by default: at 2-12 layers of width 128
  # on CPU the loop's step is faster (benchmarks/compile_depth.py).
  scan_layers: bool = False
  vision: Optional[VisionConfig] = None
  prefix_lm: bool = True  # image tokens attend to each other bidirectionally
  projector_hidden: Optional[int] = None  # vision->text projector MLP width; None = width
  # > 0: a contrastive (SigLIP) head mapping pooled image tokens and the decoder's pooled
  # text-only states to unit vectors of this size, for image-text retrieval (VLM only).
  contrastive_dim: int = 0

  def __post_init__(self):
    c = "ModelConfig"
    for f in ("vocab_size", "max_seq_len", "width", "depth", "num_heads", "linear_chunk_size"):
      _check_positive(c, f, getattr(self, f))
    for f in ("num_kv_heads", "head_dim", "mlp_dim", "num_unique_layers", "projector_hidden"):
      if getattr(self, f) is not None:
        _check_positive(c, f, getattr(self, f))
    _check_choice(c, "attention", self.attention, ATTENTION_KINDS)
    _check_choice(c, "attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice(c, "mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
    _check_choice(c, "norm", self.norm, NORM_KINDS)
    _check_choice(c, "position", self.position, POSITION_KINDS)
    _check_choice(c, "dtype", self.dtype, DTYPES)
    _check_choice(c, "param_dtype", self.param_dtype, DTYPES)
    if isinstance(self.remat, (bool, str)) and self.remat in _REMAT_LEGACY:
      object.__setattr__(self, "remat", _REMAT_LEGACY[self.remat])
    _check_choice(c, "remat", self.remat, REMAT_POLICIES)
    if not isinstance(self.scan_layers, bool):
      _fail(c, "scan_layers", self.scan_layers, "must be True or False")
    if self.head_dim is None and self.width % self.num_heads:
      _fail(c, "width", self.width, f"must be divisible by num_heads={self.num_heads} "
            "(or set head_dim explicitly)")
    for name, derive in _DERIVED.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, derive(self))
    if self.num_heads % self.num_kv_heads:
      _fail(c, "num_kv_heads", self.num_kv_heads,
            f"must divide num_heads={self.num_heads} (grouped-query attention)")
    if self.position == "rope" and self.head_dim % 2:
      _fail(c, "position", self.position,
            f"rope needs an even head_dim, got head_dim={self.head_dim}")
    if self.num_unique_layers is not None and self.num_unique_layers > self.depth:
      _fail(c, "num_unique_layers", self.num_unique_layers,
            f"must be <= depth={self.depth} (layer i uses block i mod num_unique_layers)")
    if not 0.0 <= self.dropout < 1.0:
      _fail(c, "dropout", self.dropout, "must be in [0, 1)")
    if self.scan_layers and self.dropout > 0:
      # The scan body is traced once, so it cannot advance the blocks' dropout RNG streams
      # per layer the way the Python loop does: every layer would drop the same units.
      _fail(c, "dropout", self.dropout, "must be 0 with ModelConfig.scan_layers=True "
            "(a scanned layer stack has no per-layer dropout streams); set dropout=0.0 or "
            "scan_layers=False")
    if self.norm_eps <= 0:
      _fail(c, "norm_eps", self.norm_eps, "must be > 0")
    if self.vision is not None:
      if not isinstance(self.vision, VisionConfig):
        _fail(c, "vision", self.vision, "must be a VisionConfig or None")
    if (not isinstance(self.contrastive_dim, int) or isinstance(self.contrastive_dim, bool)
        or self.contrastive_dim < 0):
      _fail(c, "contrastive_dim", self.contrastive_dim, "must be an integer >= 0 (0: no "
            "contrastive head)")
    if self.contrastive_dim and self.vision is None:
      _fail(c, "contrastive_dim", self.contrastive_dim, "needs ModelConfig.vision (the "
            "contrastive head pairs images with texts): set vision or contrastive_dim=0")

  @property
  def num_image_tokens(self) -> int:
    """P: image tokens before the text (0 without vision)."""
    return self.vision.num_tokens if self.vision is not None else 0

  @property
  def max_total_len(self) -> int:
    """S_max = P + T_max: rows of the learned position table, longest decode cache."""
    return self.num_image_tokens + self.max_seq_len

  def replace(self, **changes) -> "ModelConfig":
    """A copy with ``changes``; derived sizes that still equal their derivation from this
    config (and are not in ``changes``) are derived again from the new one."""
    for name, derive in _DERIVED.items():
      if name not in changes and getattr(self, name) == derive(self):
        changes[name] = None
    return dataclasses.replace(self, **changes)


_PRESETS = {
    # GPT-2 small (124M): the shape used for the Cloud TPU run and HF weight import.
    "gpt2-small": dict(vocab_size=50257, max_seq_len=1024, width=768, depth=12, num_heads=12,
                       mlp_dim=3072, norm="layernorm", position="learned", tie_embeddings=True),
    # The compact model of the original GPT-4o-mini sketch.
    "mini": dict(max_seq_len=256, width=128, depth=2, num_heads=4, mlp_dim=512),
    # Small enough that the whole test suite runs in minutes on 2 CPU cores.
    "tiny": dict(max_seq_len=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 linear_chunk_size=16),
}


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
  """A named ``ModelConfig``: ``gpt2-small``, ``mini`` or ``tiny`` (overrides applied)."""
  if name not in _PRESETS:
    raise ValueError(f"preset name={name!r} is unknown: allowed values are "
                     f"{', '.join(map(repr, _PRESETS))}")
  return ModelConfig(**{**_PRESETS[name], **overrides})
