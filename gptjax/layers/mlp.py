"""Transformer feed-forward: GELU (GPT-2) or SwiGLU (Shazeer 2020)."""
from __future__ import annotations

import jax
from flax import nnx

from gptjax.layers.linear import Dense


class MLP(nnx.Module):

  def __init__(self, dim: int, hidden: int, activation: str = "gelu", *, dtype, param_dtype,
               out_init_scale: float = 1.0, use_bias: bool = True, rngs: nnx.Rngs):
    self.activation = activation
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, rngs=rngs)
    self.up = Dense((dim,), (hidden,), ("embed", "mlp"), **kw)
    # SwiGLU's gate doubles the input projection; F is kept as given (LLaMA shrinks F by 2/3
    # to match GELU's parameter count — a config choice, not hidden here).
    self.gate = Dense((dim,), (hidden,), ("embed", "mlp"), **kw) if activation == "swiglu" else None
    self.down = Dense((hidden,), (dim,), ("mlp", "embed"), init_scale=out_init_scale, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.up(x)
    if self.gate is not None:
      h = jax.nn.silu(self.gate(x)) * h
    else:
      h = jax.nn.gelu(h, approximate=True)
    return self.down(h)
