"""Vision encoders with one interface: image (B, H, W, C) in [0, 1] -> tokens (B, P, D_v)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import VisionConfig
from gptjax.layers.block import Block, BlockConfig
from gptjax.layers.linear import Dense, param
from gptjax.layers.norm import Norm


def add_global_token(tokens: jax.Array, cfg: VisionConfig) -> jax.Array:
  """(B, P, D) -> (B, P + 1, D) with the channel-wise max over the grid appended.

  Why: trained from scratch, a VLM first has to learn *where* to attend among P grid tokens
  before the encoder gets a useful gradient for shape features, and the two wait on each
  other (on ``shapes``, kind-dependent answers sit at chance for ~1000 steps). A pooled
  token at a fixed position is found by position alone, so its features are trained from
  the first steps, and the grid tokens share them (same convs). The CLS / global-thumbnail
  tokens of ViTs and LLaVA-NeXT play the same role.
  """
  if not cfg.global_token:
    return tokens
  return jnp.concatenate([tokens, tokens.max(axis=1, keepdims=True)], axis=1)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """(grid*grid, dim) fixed positions, raster order: [sin x, cos x, sin y, cos y] over
  dim/4 geometric frequencies each (as in MAE / big_vision's posemb_sincos_2d).

  Why fixed 2-D positions on CNN tokens: "left of" and the left-to-right caption order need
  an x coordinate that is comparable across tokens; learned 1-D positions have to discover
  the grid's geometry first, sin-cos features give it from step 0 at no parameter cost.
  """
  q = dim // 4
  omega = 1.0 / 10_000 ** (np.arange(q) / max(q, 1))
  y, x = np.mgrid[:grid, :grid]
  ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
  return np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1).astype(np.float32)


# Inputs are centred to [-1, 1]; both encoders see the same preprocessing.
def _normalise(image: jax.Array, dtype) -> jax.Array:
  return (image.astype(jnp.float32) * 2.0 - 1.0).astype(dtype)


class CNNEncoder(nnx.Module):
  """conv3x3 -> ReLU [-> maxpool 2x2 for the first ``cnn_pools``], then a 1x1 conv to
  ``width``; each cell of the final (image_size / 2**cnn_pools)^2 grid is one image token."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    chans = (cfg.channels,) + tuple(cfg.cnn_channels)
    # nnx.Conv accepts extra kernel metadata, so it carries our logical axis names.
    self.convs = nnx.List([
        nnx.Conv(cin, cout, (3, 3), padding="SAME", dtype=dtype, param_dtype=param_dtype,
                 kernel_metadata={"logical_axes": (None, None, "conv_in", "conv_out")},
                 bias_metadata={"logical_axes": ("conv_out",)}, rngs=rngs)
        for cin, cout in zip(chans[:-1], chans[1:])])
    self.out = nnx.Conv(chans[-1], cfg.width, (1, 1), dtype=dtype, param_dtype=param_dtype,
                        kernel_metadata={"logical_axes": (None, None, "conv_in", "vision_embed")},
                        bias_metadata={"logical_axes": ("vision_embed",)}, rngs=rngs)
    self.dtype = dtype
    self.cfg = cfg

  def __call__(self, image: jax.Array) -> jax.Array:
    x = _normalise(image, self.dtype)
    for j, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if j < self.cfg.num_pools:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = self.out(x)
    b, gh, gw, d = x.shape
    tokens = x.reshape(b, gh * gw, d)
    if not self.cfg.cnn_pos_embed:
      return add_global_token(tokens, self.cfg)
    # The global token pools the features before positions are added: it is position-free.
    pos = jnp.asarray(sincos_2d(gh, d), tokens.dtype)
    out = add_global_token(tokens, self.cfg)
    return out.at[:, :gh * gw].add(pos)


def vit_block_config(cfg: VisionConfig, *, dtype, param_dtype) -> BlockConfig:
  """The ViT's blocks: bidirectional softmax attention, LayerNorm, GELU, at vision width."""
  return BlockConfig(width=cfg.width, num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                     head_dim=cfg.width // cfg.num_heads, mlp_dim=cfg.mlp_dim,
                     depth=cfg.depth, causal=False, dtype=jnp.dtype(dtype).name,
                     param_dtype=jnp.dtype(param_dtype).name)


class ViTEncoder(nnx.Module):
  """Patch embedding + learned positions + bidirectional pre-norm blocks (Dosovitskiy 2021)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    bcfg = vit_block_config(cfg, dtype=dtype, param_dtype=param_dtype)
    p, c = cfg.patch_size, cfg.channels
    self.patch_size = p
    self.cfg = cfg
    self.patch_embed = Dense((p * p * c,), (cfg.width,), ("patch", "vision_embed"),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos = param(rngs, jax.nn.initializers.normal(0.02), (cfg.grid_size**2, cfg.width),
                     ("position", "vision_embed"), param_dtype)
    self.blocks = nnx.List([Block(bcfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = Norm(cfg.width, "layernorm", param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, image: jax.Array) -> jax.Array:
    x = _normalise(image, self.dtype)
    b, h, w, c = x.shape
    p = self.patch_size
    # Non-overlapping patches by reshape: identical to a stride-p conv, no im2col.
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    x = self.patch_embed(x) + self.pos[...].astype(self.dtype)
    for block in self.blocks:
      x, _ = block(x)
    return add_global_token(self.norm(x), self.cfg)


def make_vision_encoder(cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs: nnx.Rngs) -> nnx.Module:
  cls = {"cnn": CNNEncoder, "vit": ViTEncoder}[cfg.kind]
  return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
