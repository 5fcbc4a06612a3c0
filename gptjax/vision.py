"""Vision encoders with one interface: image (B, H, W, C) in [0, 1] -> tokens (B, P, D_v)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig, VisionConfig
from gptjax.layers.linear import Dense, param
from gptjax.layers.norm import Norm

# Inputs are centred to [-1, 1]; both encoders see the same preprocessing.
def _normalise(image: jax.Array, dtype) -> jax.Array:
  return (image.astype(jnp.float32) * 2.0 - 1.0).astype(dtype)


class CNNEncoder(nnx.Module):
  """Stages of conv3x3 -> ReLU -> maxpool 2x2, then a 1x1 conv to ``width``; each cell of
  the final (image_size / 2**stages)^2 grid is one image token."""

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

  def __call__(self, image: jax.Array) -> jax.Array:
    x = _normalise(image, self.dtype)
    for conv in self.convs:
      x = nnx.max_pool(jax.nn.relu(conv(x)), (2, 2), strides=(2, 2))
    x = self.out(x)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)


def vit_block_config(cfg: VisionConfig) -> ModelConfig:
  """The ViT's encoder blocks are our transformer blocks with a derived config."""
  return ModelConfig(vocab_size=1, max_seq_len=cfg.num_tokens + 1, width=cfg.width,
                     depth=cfg.depth, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                     position="learned", attention="softmax", norm="layernorm")


class ViTEncoder(nnx.Module):
  """Patch embedding + learned positions + bidirectional pre-norm blocks (Dosovitskiy 2021)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    from gptjax.model import Block  # model imports vision; the ViT reuses its Block
    bcfg = dataclasses.replace(vit_block_config(cfg), dtype=jnp.dtype(dtype).name,
                               param_dtype=jnp.dtype(param_dtype).name)
    p, c = cfg.patch_size, cfg.channels
    self.patch_size = p
    self.patch_embed = Dense((p * p * c,), (cfg.width,), ("patch", "vision_embed"),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos = param(rngs, jax.nn.initializers.normal(0.02), (cfg.num_tokens, cfg.width),
                     (None, "vision_embed"), param_dtype)
    self.blocks = nnx.List([Block(bcfg, causal=False, rngs=rngs) for _ in range(cfg.depth)])
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
    return self.norm(x)


def make_vision_encoder(cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs: nnx.Rngs) -> nnx.Module:
  cls = {"cnn": CNNEncoder, "vit": ViTEncoder}[cfg.kind]
  return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
