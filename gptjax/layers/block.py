"""The pre-norm transformer block, built from plain sizes: the GPT decoder and the ViT
encoder both use it (causal vs bidirectional attention is the only difference)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from flax import nnx

from gptjax.layers.attention import Attention
from gptjax.layers.mlp import MLP
from gptjax.layers.norm import Norm


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Everything one block needs; no vocabulary, positions table or vision fields."""

  width: int  # D
  num_heads: int  # N
  num_kv_heads: int  # K (GQA)
  head_dim: int  # H
  mlp_dim: int  # F
  mlp_activation: str = "gelu"
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  attention: str = "softmax"  # 'softmax' | 'linear'
  attention_impl: str = "auto"
  linear_chunk_size: int = 64
  rope_theta: Optional[float] = None  # None: no rotary embedding (positions added outside)
  dropout: float = 0.0
  # GPT-2's residual-projection scaling: output projections start at 1/(2*depth) variance so
  # the residual stream's variance does not grow with the number of blocks.
  depth: int = 1
  causal: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"


def make_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  # Only a model that uses dropout holds an RNG stream: a dropout-free model's state is
  # parameters only, which keeps checkpoints and sharding trees free of key arrays. The
  # train step reseeds the stream from (seed, step) with `nnx.reseed`, so it is never
  # checkpointed either.
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
    kw = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = Norm(cfg.width, cfg.norm, **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg.width, cfg.norm, **kw)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.mlp_activation, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, out_init_scale=1.0 / (2 * cfg.depth), rngs=rngs)
    self.dropout = make_dropout(cfg.dropout, rngs)

  def __call__(self, x, *, positions=None, cache=None, cache_index=None, prefix_len=None,
               segment_ids=None, kv_segment_ids=None):
    h, cache = self.attn(self.attn_norm(x), positions=positions, cache=cache,
                         cache_index=cache_index, prefix_len=prefix_len,
                         segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    x = x + self.dropout(h)
    x = x + self.dropout(self.mlp(self.mlp_norm(x)))
    return x, cache
