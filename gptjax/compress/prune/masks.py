"""Unstructured pruning masks: global / layerwise L1 magnitude (PyTorch's counts), N:M
semi-structured sparsity, applying masks, and measuring sparsity.

Masks mirror ``params``: the same tree (Variables and their metadata included) with bool
arrays as leaves, True = kept; leaves that are not prunable get all-True masks.
"""
from __future__ import annotations

import functools
import logging
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.compress.prune._select import check_nm, check_sparsity, entries, rebuild, reduction_ndim
from gptjax.tree import path_str

log = logging.getLogger(__name__)

__all__ = ["global_magnitude", "layerwise_magnitude", "n_m", "apply_masks", "sparsity_report",
           "num_pruned"]


# ------------------------------------------------------------------------------- counts
def num_pruned(sparsity, n: int):
  """How many of ``n`` weights a sparsity prunes: ``round(sparsity * n)``, Python's round
  (half to even: 2.5 -> 2, 1.5 -> 2), exactly as ``torch.nn.utils.prune`` computes it
  (``_compute_nparams_toprune``).

  A Python number is computed exactly that way. A traced (float32) sparsity -- the gradual
  schedule's -- is rounded in float32, half to even, and a product within its float32
  rounding error of a half-integer (``(n * ulp(sparsity) + ulp(product)) / 2``) counts as
  the tie it is in decimal (float32(0.1) * 5 = 0.50000001 -> 0, like Python's 0.1 * 5 =
  0.5). float32 cannot always tell which side of a decimal tie Python's float64 product
  fell on (0.7 * 45 = 31.499999999999996 -> 31, ours 32), so at such near-ties, and with
  millions of weights, the traced count may be off by one.
  """
  if isinstance(sparsity, numbers.Real):
    return min(max(round(float(sparsity) * n), 0), n)
  s = jnp.asarray(sparsity, jnp.float32)
  nf = jnp.float32(n)
  p = s * nf
  half = jnp.floor(p) + 0.5
  tol = 0.5 * (nf * (jnp.nextafter(s, jnp.float32(2.0)) - s)
               + (jnp.nextafter(p, jnp.float32(np.inf)) - p))
  p = jnp.where(jnp.abs(p - half) <= tol, half, p)
  return jnp.clip(jnp.round(p), 0, n).astype(jnp.int32)  # jnp.round: half to even


# ------------------------------------------------------------------------------ scoring
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


def _old_masks(ents, masks):
  if masks is None:
    return [None] * len(ents)
  leaves = jax.tree.leaves(masks)
  if len(leaves) != len(ents):
    raise ValueError(f"masks has {len(leaves)} leaves but params has {len(ents)}: "
                     "pass a mask tree returned for these params")
  return leaves


def _finish(ents, treedef, keep, olds):
  """keep[i]: bool array or None (-> all True); AND with the old masks; rebuild the tree."""
  values = []
  for e, k, o in zip(ents, keep, olds):
    shape = np.shape(e.value) if e.value is not None else ()
    k = jnp.ones(shape, bool) if k is None else k
    if o is not None:
      k = k & jnp.asarray(o, bool)
    values.append(k)
  return rebuild(treedef, ents, values)


# ---------------------------------------------------- unchecked versions (gradual uses)
def magnitude_masks(params, sparsity, *, per_layer: bool, include_embeddings: bool,
                    masks=None):
  """L1 masks at ``sparsity`` (a Python number or a traced float32 scalar; not checked)."""
  ents, treedef = entries(params)
  olds = _old_masks(ents, masks)
  idx = [i for i, e in enumerate(ents) if e.prunable(include_embeddings)]
  keep = [None] * len(ents)
  if per_layer:
    for i in idx:
      v = ents[i].value
      keep[i] = _keep_top(_scores(v, olds[i]), num_pruned(sparsity, int(np.size(v)))
                          ).reshape(np.shape(v))
  elif idx:
    scores = [_scores(ents[i].value, olds[i]) for i in idx]
    sizes = [s.shape[0] for s in scores]
    flat = _keep_top(jnp.concatenate(scores), num_pruned(sparsity, sum(sizes)))
    offs = np.cumsum([0] + sizes)
    for j, i in enumerate(idx):
      keep[i] = flat[offs[j]:offs[j + 1]].reshape(np.shape(ents[i].value))
  return _finish(ents, treedef, keep, olds)


def nm_masks(params, n, m, *, include_embeddings: bool, masks=None,
             on_indivisible: str = "skip"):
  ents, treedef = entries(params)
  olds = _old_masks(ents, masks)
  keep = [None] * len(ents)
  for i, e in enumerate(ents):
    if not e.prunable(include_embeddings):
      continue
    n_in = reduction_ndim(e.value, e.axes)
    r = int(np.prod(np.shape(e.value)[:n_in]))
    if r % m:
      msg = (f"{path_str(e.names)}: reduction size {r} (dims {np.shape(e.value)[:n_in]}) is "
             f"not divisible by m={m}")
      if on_indivisible == "raise":
        raise ValueError(msg)
      log.info("%s; left dense", msg)
      continue
    keep[i] = _nm_keep(jnp.asarray(e.value), n_in, n, m, olds[i])
  return _finish(ents, treedef, keep, olds)


# ------------------------------------------------------------------------------ public
def global_magnitude(params, sparsity: float, *, include_embeddings: bool = False, masks=None):
  """Global unstructured L1 pruning over all prunable kernels, as PyTorch's
  ``global_unstructured(..., pruning_method=L1Unstructured, amount=sparsity)``.

  Returns a bool mask tree: exactly ``round(sparsity * n)`` (Python's round, half to even:
  torch's count) of the ``n`` prunable weights -- those with the smallest |w| -- are
  False; ties are broken by position (flattened leaf order, then index: the lower one is
  pruned first), so the result is deterministic. Non-prunable leaves are all True.
  ``masks``: an earlier mask tree whose pruned weights rank below every live weight, so
  they stay pruned and count towards the total.
  """
  s = check_sparsity(sparsity)
  return magnitude_masks(params, s, per_layer=False, include_embeddings=include_embeddings,
                         masks=masks)


def layerwise_magnitude(params, sparsity: float, *, include_embeddings: bool = False,
                        masks=None):
  """Like ``global_magnitude`` but per kernel, as PyTorch's ``l1_unstructured(module, name,
  amount=sparsity)`` on each: exactly ``round(sparsity * size)`` pruned in each kernel."""
  s = check_sparsity(sparsity)
  return magnitude_masks(params, s, per_layer=True, include_embeddings=include_embeddings,
                         masks=masks)


def n_m(params, n: int = 2, m: int = 4, *, include_embeddings: bool = False, masks=None,
        on_indivisible: str = "skip"):
  """N:M semi-structured sparsity (2:4 for sparse tensor cores): in every group of ``m``
  consecutive weights along each prunable kernel's flattened reduction (fan-in) axis (see
  ``reduction_ndim``), keep the ``n`` largest |w| -- exactly ``n`` per group.

  A kernel whose reduction size is not divisible by ``m`` (e.g. the first conv, 3*3*3 = 27)
  is left dense (``on_indivisible='skip'``, logged) or raises (``'raise'``).
  """
  n, m = check_nm(n, m)
  if on_indivisible not in ("skip", "raise"):
    raise ValueError(f"on_indivisible={on_indivisible!r} is invalid: 'skip' or 'raise'")
  return nm_masks(params, n, m, include_embeddings=include_embeddings, masks=masks,
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
  ents, _ = entries(params)
  kernels, zeros, count, tz, tn = {}, 0, 0, 0, 0
  for e in ents:
    if e.value is None:
      continue
    v = np.asarray(jax.device_get(e.value))
    z = int(v.size - np.count_nonzero(v))
    tz, tn = tz + z, tn + v.size
    if e.prunable(include_embeddings):
      kernels[path_str(e.names)] = z / max(v.size, 1)
      zeros, count = zeros + z, count + v.size
  return {"kernels": kernels, "global": zeros / max(count, 1), "zeros": zeros,
          "prunable": count, "total_zeros": tz, "total_params": tn,
          "overall": tz / max(tn, 1)}
