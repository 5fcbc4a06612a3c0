"""Pruning: unstructured (global / layerwise L1, N:M), structured (heads, MLP neurons, CNN
channels, which really shrink the arrays and the config) and gradual (Zhu & Gupta 2017) as an
Optax wrapper whose state holds the masks.

Written by hand rather than with ``jaxpruner``: that package is not available in this
environment, and what we need is small -- exact PyTorch-style counts, masks that keep the
``nnx.Param`` metadata, and structured pruning that edits the ``ModelConfig``.

Parameters
----------
Every function takes ``params``: ``nnx.state(model, nnx.Param)`` (an ``nnx.State`` whose leaves
are ``nnx.Param`` Variables carrying ``logical_axes`` metadata) or any pytree of arrays (e.g.
plain nested dicts). Masks mirror ``params``: the same tree (Variables included) with bool
arrays as leaves, so ``jax.tree.map(f, params, masks)`` works.

Which weights are prunable
--------------------------
A leaf is prunable when it is a floating array with ``ndim >= 2``, is not a bias or a norm
scale (its own key is ``bias``/``scale``/``b``: attention biases are 2-D (N, H)), and is not
an embedding. It is an embedding when

* its Variable's ``logical_axes`` contain ``'vocab'`` (the token table, and the untied LM
  head ``(embed, vocab)`` -- the output embedding), or
* any key on its path is one of ``EMBEDDING_NAMES`` (exact, case-insensitive match):
  ``embed``/``embedding`` (token table), ``positions``/``table``/``pos`` (learned position
  tables, the ViT's ``vision.pos``), ``head``/``lm_head``, ``wte``/``wpe`` ... This rule is
  what plain pytrees (no metadata) rely on.

``include_embeddings=True`` makes embeddings prunable too. Biases and norm scales are never
prunable; their masks are all True.

Counts
------
Like ``torch.nn.utils.prune`` with ``L1Unstructured`` except that the count is
``floor(sparsity * n)`` (PyTorch rounds): exactly that many weights are pruned even when
magnitudes tie; ties are broken by position (flattened leaf order, then index), so the
result is deterministic. Weights already pruned by ``masks=`` (an earlier mask tree) rank
below every live weight, so they stay pruned and count towards the total.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_NAMES", "NON_KERNEL_NAMES", "is_embedding", "is_prunable", "reduction_ndim",
    "global_magnitude", "layerwise_magnitude", "n_m", "apply_masks", "sparsity_report",
    "prune_heads", "prune_neurons", "prune_channels", "build_pruned", "cubic_schedule", "gradual_pruning",
    "GradualPruningState", "find_masks",
]

EMBEDDING_NAMES = frozenset({
    "embed", "embedding", "embeddings", "embed_tokens", "wte", "wpe", "positions", "table",
    "pos", "pos_embed", "pos_embedding", "position_embedding", "position_embeddings",
    "head", "lm_head",
})
# Parent-module names of attention output projections (N, H, D) in plain pytrees: their
# reduction axes are the first two.
_OUT_PROJ_NAMES = frozenset({"o", "o_proj", "out_proj"})
NON_KERNEL_NAMES = frozenset({"bias", "b", "scale"})
# ModelConfig's explicit head-dim field (None -> width // num_heads), first one present wins.
HEAD_DIM_FIELDS = ("head_size", "head_dim")


# ------------------------------------------------------------------------------ trees
def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def _path_str(names) -> str:
  return ".".join(str(n) for n in names)


class _Entry(NamedTuple):
  names: tuple  # path keys (str for dict keys / attributes, int for list indices)
  item: Any  # the Variable or the raw leaf
  value: Any  # the array (None when a Variable does not hold exactly one leaf)
  axes: Optional[tuple]  # logical_axes metadata, None without


def _entries(tree):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
  out = []
  for path, item in flat:
    names = tuple(_key(k) for k in path)
    if _is_var(item):
      axes = item.get_metadata().get("logical_axes")
      leaves = jax.tree.leaves(item)
      value = leaves[0] if len(leaves) == 1 else None
    else:
      axes, value = None, item
    out.append(_Entry(names, item, value, tuple(axes) if axes is not None else None))
  return out, treedef


def _rebuild(treedef, entries, values):
  """Same tree as ``entries`` came from, with each entry's array replaced by ``values[i]``."""
  items = []
  for e, v in zip(entries, values):
    if _is_var(e.item):
      items.append(jax.tree.map(lambda _: v, e.item))
    else:
      items.append(v)
  return jax.tree_util.tree_unflatten(treedef, items)


def is_embedding(names: Sequence, axes: Optional[Sequence] = None) -> bool:
  """See the module docstring: ``'vocab'`` in the logical axes, or an embedding name on the path."""
  if axes is not None and "vocab" in axes:
    return True
  return any(isinstance(n, str) and n.lower() in EMBEDDING_NAMES for n in names)


def is_prunable(names: Sequence, value, axes: Optional[Sequence] = None, *,
                include_embeddings: bool = False) -> bool:
  if value is None or np.ndim(value) < 2:
    return False
  if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
    return False
  if names and isinstance(names[-1], str) and names[-1].lower() in NON_KERNEL_NAMES:
    return False
  return include_embeddings or not is_embedding(names, axes)


def reduction_ndim(names: Sequence, value, axes: Optional[Sequence] = None) -> int:
  """How many leading dims of a kernel are its input (fan-in / reduction) dims.

  With logical axes: a conv kernel (kh, kw, Cin, Cout) reduces over everything up to and
  including ``'conv_in'`` (3); an attention output kernel (``'heads'``/``'kv_heads'``,
  ``'head_dim'``, ...) over its first two; every other Dense kernel over its first dim
  (q/k/v (D, N, H), MLP up (D, F), down (F, D), ...). Plain arrays: 4-D (HWIO conv) -> 3,
  3-D under a module named ``o``/``o_proj``/``out_proj`` -> 2, else 1.
  """
  nd = np.ndim(value)
  if axes is not None:
    if "conv_in" in axes:
      return axes.index("conv_in") + 1
    if nd >= 3 and axes[0] in ("heads", "kv_heads") and axes[1] == "head_dim":
      return 2
    return 1
  if nd == 4:
    return 3
  if nd == 3 and len(names) >= 2 and str(names[-2]) in _OUT_PROJ_NAMES:
    return 2
  return 1


# ------------------------------------------------------------------------- validation
def _check_sparsity(sparsity, name: str = "sparsity") -> float:
  ok = (isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
        and not math.isnan(float(sparsity)) and 0.0 <= float(sparsity) < 1.0)
  if not ok:
    raise ValueError(f"{name}={sparsity!r} is invalid: must be a number in [0, 1)")
  return float(sparsity)


def _check_int(name: str, value, lo: int, hi: Optional[int] = None, why: str = "") -> int:
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < lo
      or (hi is not None and value > hi)):
    rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{name}={value!r} is invalid: must be an integer {rng}{why}")
  return int(value)


def _check_nm(n, m) -> tuple[int, int]:
  ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, m))
  if not ok or m < 1 or n < 1 or n > m:
    raise ValueError(f"n={n!r}, m={m!r} is invalid for N:M sparsity: need integers "
                     "with 1 <= n <= m")
  return int(n), int(m)


# --------------------------------------------------------------------- mask computation
def _num_pruned(sparsity, n: int):
  """floor(sparsity * n): exact for a Python number; for a traced (float32) sparsity a
  relative 2**-20 nudge keeps float32 rounding (e.g. float32(0.7) < 0.7) from losing one
  weight; above ~2**24 weights float32 resolution may make it off by a few weights."""
  if isinstance(sparsity, numbers.Real):
    return math.floor(float(sparsity) * n)
  s = jnp.asarray(sparsity, jnp.float32)
  return jnp.floor(s * jnp.float32(n) * jnp.float32(1.0 + 2.0**-20)).astype(jnp.int32)


def _scores(value, old_mask):
  """|w| in float32; weights pruned already score -1 (below every live weight)."""
  a = jnp.abs(jnp.asarray(value).astype(jnp.float32)).reshape(-1)
  if old_mask is not None:
    a = jnp.where(jnp.asarray(old_mask).reshape(-1), a, -1.0)
  return a


@jax.jit
def _keep_top(scores, k):
  """Bool keep-mask pruning the ``k`` lowest scores (ties: lower index pruned first)."""
  n = scores.shape[0]
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank >= k


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_keep(value, n_in: int, n: int, m: int, old_mask):
  """Keep the ``n`` largest |w| of every ``m`` consecutive weights along the flattened
  reduction axis (ties: lower index kept). Pairwise ranks: exact, no sort, cheap for small m."""
  shape = value.shape
  r = int(np.prod(shape[:n_in]))
  s = _scores(value, old_mask).reshape(r // m, m, -1)  # (groups, m, fan-out)
  a, b = s[:, :, None, :], s[:, None, :, :]  # a: element i, b: element j
  j_lt_i = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[None, :, :, None]
  rank = jnp.sum((b > a) | ((b == a) & j_lt_i), axis=2)  # how many beat element i
  return (rank < n).reshape(shape)


def _old_masks(entries, masks):
  if masks is None:
    return [None] * len(entries)
  leaves = jax.tree.leaves(masks)
  if len(leaves) != len(entries):
    raise ValueError(f"masks has {len(leaves)} leaves but params has {len(entries)}: "
                     "pass a mask tree returned for these params")
  return leaves


def _finish(entries, treedef, keep, olds):
  """keep[i]: bool array or None (-> all True); AND with the old masks; rebuild the tree."""
  values = []
  for e, k, o in zip(entries, keep, olds):
    shape = np.shape(e.value) if e.value is not None else ()
    k = jnp.ones(shape, bool) if k is None else k
    if o is not None:
      k = k & jnp.asarray(o, bool)
    values.append(k)
  return _rebuild(treedef, entries, values)


def _magnitude_masks(params, sparsity, *, per_layer: bool, include_embeddings: bool,
                     masks=None):
  entries, treedef = _entries(params)
  olds = _old_masks(entries, masks)
  idx = [i for i, e in enumerate(entries)
         if is_prunable(e.names, e.value, e.axes, include_embeddings=include_embeddings)]
  keep = [None] * len(entries)
  if per_layer:
    for i in idx:
      v = entries[i].value
      keep[i] = _keep_top(_scores(v, olds[i]), _num_pruned(sparsity, int(np.size(v)))
                          ).reshape(np.shape(v))
  elif idx:
    scores = [_scores(entries[i].value, olds[i]) for i in idx]
    sizes = [s.shape[0] for s in scores]
    flat = _keep_top(jnp.concatenate(scores), _num_pruned(sparsity, sum(sizes)))
    offs = np.cumsum([0] + sizes)
    for j, i in enumerate(idx):
      keep[i] = flat[offs[j]:offs[j + 1]].reshape(np.shape(entries[i].value))
  return _finish(entries, treedef, keep, olds)


def _nm_masks(params, n, m, *, include_embeddings: bool, masks=None,
              on_indivisible: str = "skip"):
  entries, treedef = _entries(params)
  olds = _old_masks(entries, masks)
  keep = [None] * len(entries)
  for i, e in enumerate(entries):
    if not is_prunable(e.names, e.value, e.axes, include_embeddings=include_embeddings):
      continue
    n_in = reduction_ndim(e.names, e.value, e.axes)
    r = int(np.prod(np.shape(e.value)[:n_in]))
    if r % m:
      msg = (f"{_path_str(e.names)}: reduction size {r} (dims {np.shape(e.value)[:n_in]}) is "
             f"not divisible by m={m}")
      if on_indivisible == "raise":
        raise ValueError(msg)
      log.info("%s; left dense", msg)
      continue
    keep[i] = _nm_keep(jnp.asarray(e.value), n_in, n, m, olds[i])
  return _finish(entries, treedef, keep, olds)


# ----------------------------------------------------------------------- public: masks
def global_magnitude(params, sparsity: float, *, include_embeddings: bool = False, masks=None):
  """Global unstructured L1 pruning over all prunable kernels (PyTorch's
  ``global_unstructured(..., L1Unstructured, amount=sparsity)``).

  Returns a bool mask tree: exactly ``floor(sparsity * n)`` of the ``n`` prunable weights
  (those with the smallest |w|) are False; non-prunable leaves are all True. ``masks``: an
  earlier mask tree whose pruned weights stay pruned (and count).
  """
  s = _check_sparsity(sparsity)
  return _magnitude_masks(params, s, per_layer=False, include_embeddings=include_embeddings,
                          masks=masks)


def layerwise_magnitude(params, sparsity: float, *, include_embeddings: bool = False,
                        masks=None):
  """Like ``global_magnitude`` but per kernel: ``floor(sparsity * size)`` pruned in each."""
  s = _check_sparsity(sparsity)
  return _magnitude_masks(params, s, per_layer=True, include_embeddings=include_embeddings,
                          masks=masks)


def n_m(params, n: int = 2, m: int = 4, *, include_embeddings: bool = False, masks=None,
        on_indivisible: str = "skip"):
  """N:M semi-structured sparsity (2:4 for sparse tensor cores): in every group of ``m``
  consecutive weights along each prunable kernel's flattened reduction (fan-in) axis (see
  ``reduction_ndim``), keep the ``n`` largest |w| -- exactly ``n`` per group.

  A kernel whose reduction size is not divisible by ``m`` (e.g. the first conv, 3*3*3 = 27)
  is left dense (``on_indivisible='skip'``, logged) or raises (``'raise'``).
  """
  n, m = _check_nm(n, m)
  if on_indivisible not in ("skip", "raise"):
    raise ValueError(f"on_indivisible={on_indivisible!r} is invalid: 'skip' or 'raise'")
  return _nm_masks(params, n, m, include_embeddings=include_embeddings, masks=masks,
                   on_indivisible=on_indivisible)


def apply_masks(params, masks):
  """``params`` with zeros where ``masks`` is False (same tree; Variables and metadata kept)."""
  def one(p, mk):
    if isinstance(p, np.ndarray) and isinstance(mk, np.ndarray):
      return np.where(mk, p, np.zeros((), p.dtype))
    p = jnp.asarray(p)
    return jnp.where(mk, p, jnp.zeros((), p.dtype))
  return jax.tree.map(one, params, masks)


def sparsity_report(params, *, include_embeddings: bool = False) -> dict:
  """Fraction of exact zeros. Returns ``{'kernels': {path: fraction} (prunable kernels),
  'global': fraction over prunable kernels, 'zeros': int, 'prunable': int,
  'total_zeros': int, 'total_params': int, 'overall': fraction over every leaf}``."""
  entries, _ = _entries(params)
  kernels, zeros, count, tz, tn = {}, 0, 0, 0, 0
  for e in entries:
    if e.value is None:
      continue
    v = np.asarray(jax.device_get(e.value))
    z = int(v.size - np.count_nonzero(v))
    tz, tn = tz + z, tn + v.size
    if is_prunable(e.names, v, e.axes, include_embeddings=include_embeddings):
      kernels[_path_str(e.names)] = z / max(v.size, 1)
      zeros, count = zeros + z, count + v.size
  return {"kernels": kernels, "global": zeros / max(count, 1), "zeros": zeros,
          "prunable": count, "total_zeros": tz, "total_params": tn,
          "overall": tz / max(tn, 1)}


# ------------------------------------------------------------------ structured pruning
def _unpack(model_or_cfg_params):
  if isinstance(model_or_cfg_params, nnx.Module):
    model = model_or_cfg_params
    if not hasattr(model, "config"):
      raise ValueError(f"{type(model).__name__} has no .config: pass a GPT or VLM, or "
                       "(cfg, params)")
    return model.config, nnx.state(model, nnx.Param)
  if isinstance(model_or_cfg_params, (tuple, list)) and len(model_or_cfg_params) == 2:
    return tuple(model_or_cfg_params)
  raise ValueError("model_or_cfg_params must be a GPT/VLM module or a (ModelConfig, params) "
                   f"pair, got {type(model_or_cfg_params).__name__}")


class _Flat:
  """Name-addressed view of a param tree for the structured edits; ``rebuild`` keeps the
  original containers (nnx.State + Variables with metadata, or plain dicts/lists)."""

  def __init__(self, params):
    self.entries, self.treedef = _entries(params)
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
    return _rebuild(self.treedef, self.entries, vals)


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
    ``keep_heads`` (``num_kv_heads=None`` stays None).
  * Grouped-query attention (K < N): ``keep_heads`` must be a multiple of K; every kv group
    keeps its ``keep_heads / K`` best query heads, all kv heads stay (so the group layout
    that GQA relies on -- query head i uses kv head i // (N/K) -- is preserved).

  head_dim stays (so the width stays): it is written to ``ModelConfig.head_size`` (the
  explicit head dim; ``width // num_heads`` no longer holds). Only the decoder is pruned (the ViT's
  heads are sized by ``VisionConfig``). Returns ``(new_cfg, new_params)`` (``params`` of the
  same kind as given), plus ``{block: kept head indices}`` if ``return_indices``.
  """
  _check_score(score)
  cfg, params = _unpack(model_or_cfg_params)
  n_heads, kv = cfg.num_heads, cfg.kv_heads
  keep_heads = _check_int("keep_heads", keep_heads, 1, n_heads, f" (num_heads={n_heads})")
  mha = kv == n_heads
  if not mha and keep_heads % kv:
    raise ValueError(
        f"keep_heads={keep_heads} is invalid with grouped-query attention (num_heads="
        f"{n_heads}, num_kv_heads={kv}): must be a multiple of num_kv_heads so every kv group "
        "keeps the same number of query heads")
  fields = {f.name for f in dataclasses.fields(cfg)}
  head_field = next((n for n in HEAD_DIM_FIELDS if n in fields), None)
  if head_field is None:
    raise NotImplementedError(
        "prune_heads needs an explicit head-dim field on ModelConfig (one of "
        f"{HEAD_DIM_FIELDS}; None -> width // num_heads) used by Attention: fewer heads of "
        "the same head_dim no longer satisfy head_dim = width // num_heads")
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
  new_kv = cfg.num_kv_heads
  if mha and cfg.num_kv_heads is not None:
    new_kv = keep_heads
  new_cfg = dataclasses.replace(cfg, num_heads=keep_heads, num_kv_heads=new_kv,
                                **{head_field: head_dim})
  out = (new_cfg, f.rebuild())
  return out + (kept,) if return_indices else out


def prune_neurons(model_or_cfg_params, keep: int, *, score: str = "l1",
                  return_indices: bool = False):
  """Structured MLP pruning of the decoder: keep ``keep`` hidden units per block, ranked by
  the L1/L2 norm of their up column + bias (+ gate column + bias for SwiGLU) + down row.
  ``cfg.mlp_dim`` becomes ``keep``. Returns ``(new_cfg, new_params[, {block: kept}])``."""
  _check_score(score)
  cfg, params = _unpack(model_or_cfg_params)
  ffn = cfg.ffn_dim
  keep = _check_int("keep", keep, 1, ffn, f" (mlp_dim={ffn})")
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
    _check_int("keep", k, 1, c, f" (cnn_channels={chans})")
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
  from gptjax.model import GPT, VLM  # local: keeps this module importable on its own
  if model_cls is None:
    model_cls = VLM if new_cfg.vision is not None else GPT
  rngs = lambda: nnx.Rngs(params=seed, dropout=seed + 1)  # noqa: E731
  model = nnx.eval_shape(lambda: model_cls(new_cfg, rngs=rngs()))
  _, abs_params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(new_params) if isinstance(new_params, nnx.State) else new_params
  shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else np.shape(x)  # noqa: E731
  want = {_path_str(e.names): shape(e.value) for e in _entries(nnx.to_pure_dict(abs_params))[0]}
  got = {_path_str(e.names): shape(e.value) for e in _entries(pure)[0]}
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if bad:
    raise ValueError(f"params do not fit {model_cls.__name__}(new_cfg): " + "; ".join(
        f"{k}: config {want.get(k)} vs params {got.get(k)}" for k in bad[:8]))
  if jax.tree.leaves(rest):  # RNG streams (dropout > 0): need real keys, so build for real
    model = model_cls(new_cfg, rngs=rngs())
  nnx.replace_by_pure_dict(abs_params, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, abs_params)
  return model


# -------------------------------------------------------------------- gradual pruning
def cubic_schedule(step, *, initial_sparsity: float = 0.0, final_sparsity: float,
                   begin_step: int, end_step: int, frequency: int = 1):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

  Piecewise constant: t is quantised down to t0 + k*frequency, so the value (and hence the
  masks of ``gradual_pruning``) changes at most every ``frequency`` steps; it reaches
  ``final_sparsity`` at ``end_step`` (= t0 + n dt) even if that is not on the grid, and stays
  there. Before ``begin_step`` it is 0 (no pruning). jit-safe: ``step`` may be traced;
  returns a float32 scalar. Bind the keywords with ``functools.partial``.
  """
  sf = _check_sparsity(final_sparsity, "final_sparsity")
  si = _check_sparsity(initial_sparsity, "initial_sparsity")
  if si > sf:
    raise ValueError(f"initial_sparsity={initial_sparsity!r} is invalid: must be <= "
                     f"final_sparsity={final_sparsity!r}")
  begin_step = _check_int("begin_step", begin_step, 0)
  end_step = _check_int("end_step", end_step, begin_step, None, " (>= begin_step)")
  frequency = _check_int("frequency", frequency, 1)
  t = jnp.asarray(step, jnp.int32)
  tq = begin_step + ((jnp.clip(t, begin_step, end_step) - begin_step) // frequency) * frequency
  span = max(end_step - begin_step, 1)
  p = jnp.where(t >= end_step, 1.0, (tq - begin_step).astype(jnp.float32) / span)
  s = sf + (si - sf) * (1.0 - p) ** 3
  return jnp.where(t < begin_step, 0.0, s).astype(jnp.float32)


class GradualPruningState(NamedTuple):
  """Optimizer state of ``gradual_pruning``: checkpointed with the rest of ``opt_state``."""
  count: jax.Array  # int32: updates done (the step the schedule is evaluated at)
  sparsity: jax.Array  # float32: the scheduled sparsity the masks were last computed for
  masks: Any  # bool tree mirroring params (Variables kept)
  inner_state: Any


GRADUAL_METHODS = ("global", "layerwise", "n_m")


def gradual_pruning(inner: optax.GradientTransformation,
                    schedule_fn: Union[Callable[[jax.Array], jax.Array], float],
                    method: str = "global", *, n: int = 2, m: int = 4,
                    include_embeddings: bool = False) -> optax.GradientTransformation:
  """Wrap ``inner`` (e.g. AdamW) so training prunes gradually and pruned weights stay zero.

  At each ``update(grads, state, params)`` (``params`` required):
  1. gradients of pruned weights are zeroed, and ``inner`` computes its update;
  2. if ``schedule_fn(count)`` differs from the sparsity the masks were made for (a
     ``lax.cond``: usually no work), new masks are computed at that sparsity from the
     magnitudes of the *updated* params, with weights pruned already ranked lowest and the
     old mask ANDed in: masks only shrink. ``method``: 'global' | 'layerwise' magnitude,
     or 'n_m' (the N:M pattern, imposed once the schedule is > 0; its amount is fixed);
  3. the returned update is ``where(mask, u, -params)``, so ``params + update`` is exactly
     zero where pruned -- momentum and weight decay cannot regrow a pruned weight.

  The masks live in the optimizer state (``GradualPruningState``), so they are saved and
  restored with the checkpoint. jit-compatible. ``find_masks(opt_state)`` returns them.
  """
  if method not in GRADUAL_METHODS:
    raise ValueError(f"method={method!r} is invalid: allowed values are "
                     f"{', '.join(map(repr, GRADUAL_METHODS))}")
  if method == "n_m":
    n, m = _check_nm(n, m)
  if not callable(schedule_fn):
    const = _check_sparsity(schedule_fn, "schedule_fn")
    schedule_fn = lambda step: jnp.float32(const)  # noqa: E731

  def init_fn(params):
    masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    return GradualPruningState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), masks,
                               inner.init(params))

  def new_masks(params, s, old):
    if method == "n_m":
      nm = _nm_masks(params, n, m, include_embeddings=include_embeddings, masks=old)
      return jax.tree.map(lambda a, b: jnp.where(s > 0, a, b), nm, old)
    return _magnitude_masks(params, s, per_layer=method == "layerwise",
                            include_embeddings=include_embeddings, masks=old)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("gradual_pruning needs params: call update(grads, state, params)")
    grads = apply_masks(updates, state.masks)
    inner_updates, inner_state = inner.update(grads, state.inner_state, params)
    candidate = optax.apply_updates(params, inner_updates)
    s = jnp.asarray(schedule_fn(state.count), jnp.float32)
    masks = jax.lax.cond(s != state.sparsity, lambda: new_masks(candidate, s, state.masks),
                         lambda: state.masks)
    final = jax.tree.map(
        lambda mk, u, p: jnp.where(mk, u, -jnp.asarray(p).astype(u.dtype)),
        masks, inner_updates, params)
    return final, GradualPruningState(state.count + 1, s, masks, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def find_masks(opt_state):
  """The masks held by the first ``GradualPruningState`` inside ``opt_state`` (or None)."""
  is_gp = lambda x: isinstance(x, GradualPruningState)  # noqa: E731
  for x in jax.tree.leaves(opt_state, is_leaf=is_gp):
    if is_gp(x):
      return x.masks
  return None
