"""Structured pruning: remove whole attention heads, MLP hidden units or CNN channels. The
arrays really shrink and the ``ModelConfig`` is edited to match, so ``build_pruned`` makes
the smaller model (fewer parameters, less compute), not a masked copy.

Units are ranked by the L1 / L2 norm of every weight removed with them. The surgery
addresses this codebase's own module layout (``blocks.i.attn.q.kernel`` (D, N, H),
``o.kernel`` (N, H, D), ``mlp.up`` / ``gate`` (D, F), ``down`` (F, D), ``vision.convs.j``
HWIO), in an ``nnx.State`` or its pure-dict view alike.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.compress.prune._select import check_int, entries, rebuild
from gptjax.layout import loop_layout, to_layout
from gptjax.model import GPT, VLM
from gptjax.tree import path_str

__all__ = ["prune_heads", "prune_neurons", "prune_channels", "build_pruned"]


# ------------------------------------------------------------------ structured pruning
def _unpack(model_or_cfg_params):
  if isinstance(model_or_cfg_params, nnx.Module):
    model = model_or_cfg_params
    if not hasattr(model, "config"):
      raise ValueError(f"{type(model).__name__} has no .config: pass a GPT or VLM, or "
                       "(cfg, params)")
    model = loop_layout(model)  # blocks pruned per layer cannot stay stacked
    return model.config, nnx.state(model, nnx.Param)
  if isinstance(model_or_cfg_params, (tuple, list)) and len(model_or_cfg_params) == 2:
    cfg, params = model_or_cfg_params
    if getattr(cfg, "scan_layers", False):
      cfg, params = dataclasses.replace(cfg, scan_layers=False), to_layout(params, False)
    return cfg, params
  raise ValueError("model_or_cfg_params must be a GPT/VLM module or a (ModelConfig, params) "
                   f"pair, got {type(model_or_cfg_params).__name__}")


class _Flat:
  """Name-addressed view of a param tree for the structured edits; ``rebuild`` keeps the
  original containers (nnx.State + Variables with metadata, or plain dicts/lists)."""

  def __init__(self, params):
    self.entries, self.treedef = entries(params)
    self.values = {e.names: e.value for e in self.entries}
    self.decoder = ("decoder",) if any(e.names[:1] == ("decoder",) for e in self.entries) else ()

  def __contains__(self, names):
    return tuple(names) in self.values

  def get(self, *names):
    return np.asarray(jax.device_get(self.values[tuple(names)]))

  def set(self, names, value):
    self.values[tuple(names)] = value

  def blocks(self, prefix):
    """Sorted indices of ``prefix + ('blocks', i, ...)`` (one per *unique* block)."""
    p = len(prefix)
    return sorted({e.names[p + 1] for e in self.entries
                   if e.names[:p] == tuple(prefix) and len(e.names) > p + 1
                   and e.names[p] == "blocks"})

  def rebuild(self):
    vals = [self.values[e.names] for e in self.entries]
    vals = [jnp.asarray(v) if isinstance(v, np.ndarray) and isinstance(e.value, jax.Array) else v
            for e, v in zip(self.entries, vals)]
    return rebuild(self.treedef, self.entries, vals)


def _unit_scores(slices, score: str) -> np.ndarray:
  """slices: arrays with the unit axis first -> per-unit L1 (sum |w|) or L2 (sqrt sum w^2)
  over all of them together."""
  if score == "l1":
    tot = sum(np.abs(s.astype(np.float64)).reshape(s.shape[0], -1).sum(1) for s in slices)
    return tot
  tot = sum(np.square(s.astype(np.float64)).reshape(s.shape[0], -1).sum(1) for s in slices)
  return np.sqrt(tot)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the ``k`` highest scores (ties: lower index), in ascending order."""
  order = np.argsort(-scores, kind="stable")
  return np.sort(order[:k])


def _check_score(score):
  if score not in ("l1", "l2"):
    raise ValueError(f"score={score!r} is invalid: allowed values are 'l1', 'l2'")


def _take(x, idx, axis):
  return np.take(x, idx, axis=axis)


def prune_heads(model_or_cfg_params, keep_heads: int, *, score: str = "l1",
                return_indices: bool = False):
  """Structured head pruning of the decoder's attention: keep ``keep_heads`` query heads per
  layer (each unique block ranks its own heads; the count is global because ``num_heads``
  is), ranked by the L1/L2 norm of every weight removed with the head -- its q kernel and
  bias slices and its o kernel slice (plus its k/v slices when K == N).

  * Multi-head attention (K == N): kv heads go with their query heads; K becomes
    ``keep_heads``.
  * Grouped-query attention (K < N): ``keep_heads`` must be a multiple of K; every kv group
    keeps its ``keep_heads / K`` best query heads, all kv heads stay (so the group layout
    that GQA relies on -- query head i uses kv head i // (N/K) -- is preserved).

  head_dim stays (so the width stays): it is written to ``ModelConfig.head_dim``
  explicitly (``width // num_heads`` no longer holds). Only the decoder is pruned (the ViT's
  heads are sized by ``VisionConfig``). Returns ``(new_cfg, new_params)`` (``params`` of the
  same kind as given), plus ``{block: kept head indices}`` if ``return_indices``.
  """
  _check_score(score)
  cfg, params = _unpack(model_or_cfg_params)
  n_heads, kv = cfg.num_heads, cfg.num_kv_heads
  keep_heads = check_int("keep_heads", keep_heads, 1, n_heads, f" (num_heads={n_heads})")
  mha = kv == n_heads
  if not mha and keep_heads % kv:
    raise ValueError(
        f"keep_heads={keep_heads} is invalid with grouped-query attention (num_heads="
        f"{n_heads}, num_kv_heads={kv}): must be a multiple of num_kv_heads so every kv group "
        "keeps the same number of query heads")
  f = _Flat(params)
  d = f.decoder
  kept, head_dim = {}, None
  for b in f.blocks(d):
    a = d + ("blocks", b, "attn")
    q, o = f.get(*a, "q", "kernel"), f.get(*a, "o", "kernel")  # (D, N, H), (N, H, D)
    head_dim = q.shape[-1]
    slices = [np.moveaxis(q, 1, 0), o]
    has = lambda *n: (a + n) in f  # noqa: E731
    if has("q", "bias"):
      slices.append(f.get(*a, "q", "bias"))
    if mha:
      for kv_name in ("k", "v"):
        slices.append(np.moveaxis(f.get(*a, kv_name, "kernel"), 1, 0))
        if has(kv_name, "bias"):
          slices.append(f.get(*a, kv_name, "bias"))
    s = _unit_scores(slices, score)
    if mha:
      idx = _top(s, keep_heads)
    else:
      g, per = n_heads // kv, keep_heads // kv
      idx = np.concatenate([gi * g + _top(s[gi * g:(gi + 1) * g], per) for gi in range(kv)])
    kept[b] = idx
    f.set(a + ("q", "kernel"), _take(q, idx, 1))
    f.set(a + ("o", "kernel"), _take(o, idx, 0))
    if has("q", "bias"):
      f.set(a + ("q", "bias"), _take(f.get(*a, "q", "bias"), idx, 0))
    if mha:
      for kv_name in ("k", "v"):
        f.set(a + (kv_name, "kernel"), _take(f.get(*a, kv_name, "kernel"), idx, 1))
        if has(kv_name, "bias"):
          f.set(a + (kv_name, "bias"), _take(f.get(*a, kv_name, "bias"), idx, 0))
  if head_dim is None:
    raise ValueError("no decoder attention blocks found in params")
  # Every changed size explicit: head_dim no longer equals width // num_heads.
  new_cfg = dataclasses.replace(cfg, num_heads=keep_heads, num_kv_heads=keep_heads if mha else kv,
                                head_dim=head_dim)
  out = (new_cfg, f.rebuild())
  return out + (kept,) if return_indices else out


def prune_neurons(model_or_cfg_params, keep: int, *, score: str = "l1",
                  return_indices: bool = False):
  """Structured MLP pruning of the decoder: keep ``keep`` hidden units per block, ranked by
  the L1/L2 norm of their up column + bias (+ gate column + bias for SwiGLU) + down row.
  ``cfg.mlp_dim`` becomes ``keep``. Returns ``(new_cfg, new_params[, {block: kept}])``."""
  _check_score(score)
  cfg, params = _unpack(model_or_cfg_params)
  ffn = cfg.mlp_dim
  keep = check_int("keep", keep, 1, ffn, f" (mlp_dim={ffn})")
  f = _Flat(params)
  d = f.decoder
  kept = {}
  for b in f.blocks(d):
    p = d + ("blocks", b, "mlp")
    cols = [n for n in ("up", "gate") if p + (n, "kernel") in f]
    slices = [f.get(*p, n, "kernel").T for n in cols]
    slices += [f.get(*p, n, "bias") for n in cols if p + (n, "bias") in f]
    down = f.get(*p, "down", "kernel")  # (F, D)
    slices.append(down)
    idx = _top(_unit_scores(slices, score), keep)
    kept[b] = idx
    for n in cols:
      f.set(p + (n, "kernel"), _take(f.get(*p, n, "kernel"), idx, 1))
      if p + (n, "bias") in f:
        f.set(p + (n, "bias"), _take(f.get(*p, n, "bias"), idx, 0))
    f.set(p + ("down", "kernel"), _take(down, idx, 0))
  if not kept:
    raise ValueError("no decoder MLP blocks found in params")
  out = (dataclasses.replace(cfg, mlp_dim=keep), f.rebuild())
  return out + (kept,) if return_indices else out


def prune_channels(model_or_cfg_params, keep: Union[int, Sequence[int]], *, score: str = "l1",
                   return_indices: bool = False):
  """Structured channel pruning of the CNN vision encoder: conv j's output channels (= conv
  j+1's input channels; the last conv's feed ``vision.out``). ``keep``: one int for every
  stage or one per stage. Channels are ranked by the L1/L2 norm of their conv kernel slice
  and bias plus the next conv's input slice; stages are pruned in order, so conv j's slice
  covers only the input channels stage j-1 kept. Returns ``(new_cfg, new_params[, {stage: kept}])``
  with ``VisionConfig.cnn_channels = keep``."""
  _check_score(score)
  cfg, params = _unpack(model_or_cfg_params)
  v = cfg.vision
  if v is None or v.kind != "cnn":
    raise ValueError(f"prune_channels needs a cnn vision encoder, got vision="
                     f"{None if v is None else v.kind!r}")
  chans = tuple(v.cnn_channels)
  if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
    keep = (int(keep),) * len(chans)
  keep = tuple(keep)
  if len(keep) != len(chans):
    raise ValueError(f"keep={keep!r} is invalid: one int, or one per stage "
                     f"(cnn_channels={chans})")
  for k, c in zip(keep, chans):
    check_int("keep", k, 1, c, f" (cnn_channels={chans})")
  f = _Flat(params)
  vp = ("vision",)
  kept = {}
  for j in range(len(chans)):
    conv = vp + ("convs", j)
    nxt = vp + ("convs", j + 1) if j + 1 < len(chans) else vp + ("out",)
    kern, nk = f.get(*conv, "kernel"), f.get(*nxt, "kernel")  # (kh, kw, Cin, Cout), (.., C, ..)
    slices = [np.moveaxis(kern, 3, 0), np.moveaxis(nk, 2, 0)]
    if conv + ("bias",) in f:
      slices.append(f.get(*conv, "bias"))
    idx = _top(_unit_scores(slices, score), keep[j])
    kept[j] = idx
    f.set(conv + ("kernel",), _take(kern, idx, 3))
    if conv + ("bias",) in f:
      f.set(conv + ("bias",), _take(f.get(*conv, "bias"), idx, 0))
    f.set(nxt + ("kernel",), _take(nk, idx, 2))
  new_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(v, cnn_channels=keep))
  out = (new_cfg, f.rebuild())
  return out + (kept,) if return_indices else out


def build_pruned(model_cls, new_cfg, new_params, *, seed: int = 0) -> nnx.Module:
  """The smaller model holding ``new_params``: built abstractly (``nnx.eval_shape``, no
  random init) and filled with ``nnx.update``. ``model_cls``: GPT / VLM, or None to pick
  from ``new_cfg.vision``. Raises ValueError if a shape disagrees with ``new_cfg``."""
  if model_cls is None:
    model_cls = VLM if new_cfg.vision is not None else GPT
  rngs = lambda: nnx.Rngs(params=seed, dropout=seed + 1)  # noqa: E731
  model = nnx.eval_shape(lambda: model_cls(new_cfg, rngs=rngs()))
  _, abs_params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(new_params) if isinstance(new_params, nnx.State) else new_params
  shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else np.shape(x)  # noqa: E731
  want = {path_str(e.names): shape(e.value) for e in entries(nnx.to_pure_dict(abs_params))[0]}
  got = {path_str(e.names): shape(e.value) for e in entries(pure)[0]}
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if bad:
    raise ValueError(f"params do not fit {model_cls.__name__}(new_cfg): " + "; ".join(
        f"{k}: config {want.get(k)} vs params {got.get(k)}" for k in bad[:8]))
  if jax.tree.leaves(rest):  # RNG streams (dropout > 0): need real keys, so build for real
    model = model_cls(new_cfg, rngs=rngs())
  nnx.replace_by_pure_dict(abs_params, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, abs_params)
  return model
