"""Hugging Face GPT-2 checkpoints in and out: ``load(dir) -> gptjax.GPT``, ``save(model, dir)``.

  python -m gptjax.interop.hf_gpt2 import HF_DIR --out GPTJAX_DIR
  python -m gptjax.interop.hf_gpt2 export GPTJAX_DIR --out HF_DIR

A Hugging Face directory is ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``
when torch is installed), as ``GPT2LMHeadModel.save_pretrained`` writes it; any size
(124M ... 1.5B, or a custom config). A gptjax directory is ``model_config.json`` (the
``ModelConfig`` fields) + ``params/`` (an Orbax pytree of the ``nnx.Param`` state).

Why by hand: Flax dropped its GPT-2 classes from ``transformers`` 5, and the layout
differences are small and fixed — GPT-2's ``Conv1D`` stores kernels as (in, out) like our
``Dense``; the fused ``c_attn`` (D, 3D) splits into q/k/v (D, N, H); heads are a real axis
in our kernels. Tensors are read one at a time through safetensors' NumPy API and placed
into the (abstract) model as they come, so converting needs about one copy of the weights
in host memory, not three.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.data.tokenizers import BPETokenizer, save_tokenizer
from gptjax.layout import to_layout
from gptjax.model import GPT

SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
# Both spell GELU with the tanh approximation, which is what our MLP computes.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GPTJAX_CONFIG = "model_config.json"


def _fail(field: str, value, allowed: str):
  raise ValueError(f"GPT-2 config.json {field}={value!r} is not supported: {allowed}")


def config_from_hf(hf: dict) -> ModelConfig:
  """The ``ModelConfig`` of a Hugging Face GPT-2 ``config.json`` (as a dict)."""
  if hf.get("model_type") != "gpt2":
    _fail("model_type", hf.get("model_type"), "only 'gpt2' checkpoints are read here")
  act = hf.get("activation_function", "gelu_new")
  if act not in GELU_TANH:
    _fail("activation_function", act, f"allowed values are {GELU_TANH}")
  for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                  ("reorder_and_upcast_attn", False)):
    if hf.get(key, ok) != ok:
      _fail(key, hf.get(key), f"only {ok} is implemented")
  return ModelConfig(
      vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], width=hf["n_embd"],
      depth=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
      mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"], mlp_activation="gelu", norm="layernorm",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
      tie_embeddings=hf.get("tie_word_embeddings", True), attention="softmax")


def config_to_hf(cfg: ModelConfig) -> dict:
  """The Hugging Face ``config.json`` of a GPT-2-shaped ``ModelConfig`` (errors name the
  field that GPT-2 cannot express)."""
  need = dict(mlp_activation="gelu", norm="layernorm", position="learned", attention="softmax",
              num_kv_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads,
              num_unique_layers=cfg.depth, vision=None)
  for field, want in need.items():
    if getattr(cfg, field) != want:
      raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} has no GPT-2 equivalent: "
                       f"GPT-2 needs {want!r}")
  return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
              n_positions=cfg.max_seq_len, n_embd=cfg.width, n_layer=cfg.depth,
              n_head=cfg.num_heads, n_inner=cfg.mlp_dim, activation_function="gelu_new",
              layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              scale_attn_weights=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


# ------------------------------------------------------------------------ the layout map
def _mapping(cfg: ModelConfig) -> dict[str, tuple[tuple, Callable, Callable]]:
  """HF tensor name (without the ``transformer.`` prefix) -> (our param path, HF -> ours,
  ours -> HF). c_attn is listed three times (q, k, v): each takes its third."""
  d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
  ident = lambda x: x  # noqa: E731
  m = {"wte.weight": (("embed", "embedding"), ident, ident),
       "wpe.weight": (("positions", "table"), ident, ident),
       "ln_f.weight": (("final_norm", "scale"), ident, ident),
       "ln_f.bias": (("final_norm", "bias"), ident, ident)}
  for i in range(cfg.depth):
    p, b = f"h.{i}.", ("blocks", i)
    m[p + "ln_1.weight"] = (b + ("attn_norm", "scale"), ident, ident)
    m[p + "ln_1.bias"] = (b + ("attn_norm", "bias"), ident, ident)
    m[p + "ln_2.weight"] = (b + ("mlp_norm", "scale"), ident, ident)
    m[p + "ln_2.bias"] = (b + ("mlp_norm", "bias"), ident, ident)
    for j, name in enumerate("qkv"):
      m[f"{p}attn.c_attn.weight#{name}"] = (
          b + ("attn", name, "kernel"),
          lambda x, j=j: x[:, j * d:(j + 1) * d].reshape(d, n, h),
          lambda x: x.reshape(d, n * h))
      m[f"{p}attn.c_attn.bias#{name}"] = (
          b + ("attn", name, "bias"),
          lambda x, j=j: x[j * d:(j + 1) * d].reshape(n, h), lambda x: x.reshape(n * h))
    m[p + "attn.c_proj.weight"] = (b + ("attn", "o", "kernel"), lambda x: x.reshape(n, h, d),
                                   lambda x: x.reshape(n * h, d))
    m[p + "attn.c_proj.bias"] = (b + ("attn", "o", "bias"), ident, ident)
    m[p + "mlp.c_fc.weight"] = (b + ("mlp", "up", "kernel"), ident, ident)
    m[p + "mlp.c_fc.bias"] = (b + ("mlp", "up", "bias"), ident, ident)
    m[p + "mlp.c_proj.weight"] = (b + ("mlp", "down", "kernel"), ident, ident)
    m[p + "mlp.c_proj.bias"] = (b + ("mlp", "down", "bias"), ident, ident)
  if not cfg.tie_embeddings:
    m["lm_head.weight"] = (("head", "kernel"), lambda x: x.T, lambda x: x.T)
  return m


class _Reader:
  """HF tensors by name, read lazily one at a time (``transformer.`` prefix optional)."""

  def __init__(self, path: str):
    self.path = path
    st, pt = os.path.join(path, SAFETENSORS), os.path.join(path, TORCH_BIN)
    if os.path.exists(st):
      from safetensors import safe_open  # optional dependency (the 'interop' extra)
      self._file = safe_open(st, framework="numpy")
      self.names = set(self._file.keys())
      self._get = self._file.get_tensor
    elif os.path.exists(pt):
      import torch  # optional dependency: only for pytorch_model.bin checkpoints
      sd = torch.load(pt, map_location="cpu", weights_only=True)
      self.names = set(sd)
      self._get = lambda k: sd[k].float().numpy() if sd[k].dtype == torch.bfloat16 \
          else sd[k].numpy()
    else:
      raise FileNotFoundError(f"{path!r} has neither {SAFETENSORS} nor {TORCH_BIN}")

  def get(self, name: str) -> np.ndarray:
    for full in (f"transformer.{name}", name):
      if full in self.names:
        return self._get(full)
    raise KeyError(f"tensor {'transformer.' + name!r} is missing from {self.path}")


def _cached(reader: _Reader) -> Callable[[str], np.ndarray]:
  """c_attn is split three ways: keep the last fused tensor read instead of reading it
  three times."""
  last: dict = {}

  def get(name):
    if name not in last:
      last.clear()
      last[name] = reader.get(name)
    return last[name]

  return get


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def load(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> GPT:
  """A ``gptjax.GPT`` with the weights of the Hugging Face GPT-2 checkpoint in ``path``;
  its logits equal ``GPT2LMHeadModel``'s (float32: to ~1e-5)."""
  with open(os.path.join(path, "config.json")) as f:
    cfg = dataclasses.replace(config_from_hf(json.load(f)), dtype=dtype, param_dtype=param_dtype)
  abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  get = _cached(_Reader(path))
  for name, (ours, to_ours, _) in _mapping(cfg).items():
    want = _get(pure, ours)
    arr = to_ours(get(name.split("#")[0]))
    if tuple(arr.shape) != tuple(want.shape):
      raise ValueError(f"tensor {name.split('#')[0]!r}: shape {tuple(get(name.split('#')[0]).shape)} "
                       f"does not match config.json (gptjax {'.'.join(map(str, ours))} "
                       f"needs {tuple(want.shape)})")
    _set(pure, ours, jnp.asarray(arr, param_dtype))
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def hf_tensors(model: GPT) -> Iterator[tuple[str, np.ndarray]]:
  """(HF tensor name, float32 array) for every GPT-2 tensor of ``model``."""
  cfg = model.config
  pure = to_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), False)  # h.<i> per block
  fused: dict[str, list] = {}
  for name, (ours, _, to_hf) in _mapping(cfg).items():
    arr = np.asarray(jax.device_get(_get(pure, ours)), np.float32)
    base, _, part = name.partition("#")
    full = base if base.startswith("lm_head") else f"transformer.{base}"
    if part:  # q, k, v -> one fused c_attn tensor, in that order
      fused.setdefault(full, []).append(to_hf(arr))
      if len(fused[full]) == 3:
        yield full, np.concatenate(fused.pop(full), axis=-1)
    else:
      yield full, to_hf(arr)


def save(model: GPT, path: str) -> None:
  """Write ``model`` as a Hugging Face GPT-2 checkpoint (``config.json`` +
  ``model.safetensors``) that ``GPT2LMHeadModel.from_pretrained(path)`` loads."""
  from safetensors.numpy import save_file  # optional dependency (the 'interop' extra)
  if not isinstance(model, GPT):
    raise TypeError(f"save() takes a gptjax.GPT, got {type(model).__name__}")
  hf = config_to_hf(model.config)
  os.makedirs(path, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in hf_tensors(model)},
            os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)


# ------------------------------------------------------------------- gptjax directories
def save_gptjax(model: GPT, path: str) -> None:
  """``model_config.json`` + ``params/`` (Orbax) in ``path``."""
  os.makedirs(path, exist_ok=True)
  d = dataclasses.asdict(model.config)
  with open(os.path.join(path, GPTJAX_CONFIG), "w") as f:
    json.dump(d, f, indent=2)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(os.path.join(path, "params")),
            nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
  ckpt.wait_until_finished()


def load_gptjax(path: str) -> GPT:
  with open(os.path.join(path, GPTJAX_CONFIG)) as f:
    d = json.load(f)
  if d.get("vision") is not None:
    raise ValueError(f"{path}: a VLM has no GPT-2 equivalent (ModelConfig.vision is set)")
  cfg = ModelConfig(**d)
  abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")))
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m gptjax.interop.hf_gpt2",
                               description="Convert GPT-2 checkpoints between Hugging Face "
                                           "and gptjax.")
  sub = ap.add_subparsers(dest="cmd", required=True)
  imp = sub.add_parser("import", help="Hugging Face directory -> gptjax directory")
  imp.add_argument("src")
  imp.add_argument("--out", required=True)
  exp = sub.add_parser("export", help="gptjax directory -> Hugging Face directory")
  exp.add_argument("src")
  exp.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  if args.cmd == "import":
    model = load(args.src)
    save_gptjax(model, args.out)
    if any(os.path.exists(os.path.join(args.src, f)) for f in ("tokenizer.json", "vocab.json")):
      # The tokenizer travels with the weights: `python -m gptjax.sample` finds it there.
      save_tokenizer(BPETokenizer.from_file(args.src), os.path.join(args.out, "tokenizer"))
  else:
    model = load_gptjax(args.src)
    save(model, args.out)
  print(f"{args.cmd}: {args.src} -> {args.out} ({model.config.depth} layers, width "
        f"{model.config.width}, vocab {model.config.vocab_size})")


if __name__ == "__main__":
  main()
