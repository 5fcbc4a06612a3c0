"""Pruning: unstructured (global / layerwise L1, N:M: ``masks``), structured (heads, MLP
neurons, CNN channels, which really shrink the arrays and the config: ``structured``) and
gradual (Zhu & Gupta 2017) as an Optax wrapper whose state holds the masks (``gradual``).

Written by hand rather than with ``jaxpruner``: that package is not available in this
environment, and what we need is small -- exact PyTorch counts, masks that keep the
``nnx.Param`` metadata, and structured pruning that edits the ``ModelConfig``.

Parameters
----------
Every function takes ``params``: ``nnx.state(model, nnx.Param)`` (an ``nnx.State`` whose
leaves are ``nnx.Param`` Variables carrying ``logical_axes`` metadata) or any pytree of
arrays (e.g. plain nested dicts). Masks mirror ``params``: the same tree (Variables
included) with bool arrays as leaves, so ``jax.tree.map(f, params, masks)`` works.

Which weights are prunable (``_select``)
----------------------------------------
Decided by a leaf's ``logical_axes`` (the names ``gptjax.sharding`` maps to mesh axes),
never by its path:

* Reduction (input) dims, ``reduction_ndim``: the leading dims up to and including
  ``'conv_in'`` (conv kernels (kh, kw, Cin, Cout): 3); the first two when the axes start
  with (``'heads'`` | ``'kv_heads'``, ``'head_dim'``) (the attention output (N, H, D));
  otherwise the first one (Dense (D, F) / (F, D), q/k/v (D, N, H), ...).
* A *kernel* is a floating leaf with at least one reduction dim and at least one output
  dim after them: ``ndim > reduction_ndim``. So biases and norm scales/biases are never
  kernels: they are 1-D (``('norm',)``, ``('mlp',)``, ``('conv_out',)`` ...) or, for the
  q/k/v biases, ``('heads' | 'kv_heads', 'head_dim')`` -- reduction-like axes only.
* An *embedding* is a leaf whose axes contain ``'vocab'`` (the token table
  ``('vocab', 'embed')``, the untied LM head ``('embed', 'vocab')``) or ``'position'`` (the
  learned position tables: ``LearnedPositions`` ``('position', 'embed')``, the ViT's
  ``pos`` ``('position', 'vision_embed')``).
* Prunable = kernel and not embedding; ``include_embeddings=True`` makes embeddings
  prunable too. Non-prunable leaves get all-True masks.
* Plain arrays (and Variables without ``logical_axes``) carry no such information: every
  floating leaf with ``ndim >= 2`` is a prunable kernel whose reduction dims are all but
  the last (``ndim - 1``: (in, out) -> 1, an HWIO conv -> 3, (N, H, D) -> 2); nothing is
  an embedding. The caller passes what they want pruned (e.g. only the kernels).

Counts
------
Like ``torch.nn.utils.prune`` with ``L1Unstructured``: ``round(sparsity * n)`` weights
(Python's round, half to even, as torch's ``_compute_nparams_toprune``) are pruned, exactly
that many even when magnitudes tie; ties are broken by position (flattened leaf order,
then index), so the result is deterministic. Weights already pruned by ``masks=`` (an
earlier mask tree) rank below every live weight, so they stay pruned and count towards
the total.
"""
from gptjax.compress.prune._select import (EMBEDDING_AXES, is_embedding, is_kernel, is_prunable,
                                           reduction_ndim)
from gptjax.compress.prune.gradual import (GRADUAL_METHODS, GradualPruningState, cubic_schedule,
                                           find_masks, gradual_pruning)
from gptjax.compress.prune.masks import (apply_masks, global_magnitude, layerwise_magnitude, n_m,
                                         num_pruned, sparsity_report)
from gptjax.compress.prune.structured import (build_pruned, prune_channels, prune_heads,
                                              prune_neurons)

__all__ = [
    "EMBEDDING_AXES", "is_embedding", "is_kernel", "is_prunable", "reduction_ndim",
    "global_magnitude", "layerwise_magnitude", "n_m", "apply_masks", "sparsity_report",
    "num_pruned", "prune_heads", "prune_neurons", "prune_channels", "build_pruned",
    "cubic_schedule", "gradual_pruning", "GradualPruningState", "GRADUAL_METHODS", "find_masks",
]
