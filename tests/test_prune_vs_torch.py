"""gptjax.compress.prune against PyTorch's own pruning: the same masks as
``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=a)`` and, per tensor,
``l1_unstructured``, including amounts where ``a * n`` ends in exactly .5 (torch rounds half
to even). Magnitudes are distinct, so the masks are unique and compare exactly."""
import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
torch_prune = pytest.importorskip("torch.nn.utils.prune")

from gptjax.compress import prune  # noqa: E402
from gptjax.config import preset  # noqa: E402
from gptjax.model import GPT  # noqa: E402

# Kernel shapes of different ranks, sizes 10, 6, 36, 28, 24, 9 (total 113); a 1-D bias is
# in the trees too: never prunable, so it is neither given to torch nor masked.
SHAPES = {"a": (2, 5), "b": (3, 2), "c": (3, 3, 2, 2), "d": (4, 7), "e": (2, 3, 4), "f": (3, 3)}
AMOUNTS = [0.1, 0.125, 0.25, 0.3, 0.5, 0.75, 0.9]
# Global pruning over these leaf sets (113, 25, 19, 10 weights). Exact .5 products, e.g.:
# 0.5 * 113 = 56.5 -> 56, 0.3 * 25 = 7.5 -> 8, 0.1 * 25 = 2.5 -> 2, 0.5 * 19 = 9.5 -> 10,
# 0.25 * 10 = 2.5 -> 2; per tensor 0.25 * 6 = 1.5 -> 2, 0.125 * 36 = 4.5 -> 4,
# 0.125 * 28 = 3.5 -> 4, 0.75 * 6 = 4.5 -> 4, 0.5 * 9 = 4.5 -> 4.
GLOBAL_SETS = [tuple(SHAPES), ("a", "b", "f"), ("a", "f"), ("a",)]


def distinct_tree(seed, shapes=SHAPES):
  """Leaves holding a random permutation of distinct magnitudes with random signs."""
  r = np.random.default_rng(seed)
  n = sum(int(np.prod(s)) for s in shapes.values())
  mags = (r.permutation(n) + 1).astype(np.float32) / n
  signs = r.choice(np.array([-1.0, 1.0], np.float32), size=n)
  vals = mags * signs
  tree, off = {}, 0
  for k, s in shapes.items():
    tree[k] = vals[off:off + int(np.prod(s))].reshape(s)
    off += int(np.prod(s))
  tree["bias"] = r.normal(size=(7,)).astype(np.float32)
  return tree


def torch_modules(tree):
  mods = {}
  for k, x in tree.items():
    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(torch.from_numpy(np.array(x)))
    mods[k] = m
  return mods


def torch_global_masks(tree, amount):
  mods = torch_modules(tree)
  torch_prune.global_unstructured([(m, "weight") for m in mods.values()],
                                  pruning_method=torch_prune.L1Unstructured, amount=amount)
  return {k: m.weight_mask.numpy().astype(bool) for k, m in mods.items()}


def torch_layerwise_masks(tree, amount):
  out = {}
  for k, m in torch_modules(tree).items():
    torch_prune.l1_unstructured(m, "weight", amount=amount)
    out[k] = m.weight_mask.numpy().astype(bool)
  return out


def kernels_of(tree):
  return {k: v for k, v in tree.items() if v.ndim >= 2}


def size(keys):
  return sum(int(np.prod(SHAPES[k])) for k in keys)


@pytest.mark.parametrize("kind", ["global", "layerwise"])
def test_amounts_include_exact_half_counts(kind):
  """Ties that round up and ties that round down (half to even) are really covered."""
  sizes = ([size(ks) for ks in GLOBAL_SETS] if kind == "global"
           else [size([k]) for k in SHAPES])
  half = [(a, n) for a in AMOUNTS for n in sizes if (a * n) % 1 == 0.5]
  assert any(round(a * n) > a * n for a, n in half)
  assert any(round(a * n) < a * n for a, n in half)


@pytest.mark.parametrize("keys", GLOBAL_SETS, ids=lambda ks: "".join(ks))
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_global_magnitude_matches_torch_global_unstructured(seed, amount, keys):
  tree = distinct_tree(seed)
  sub = {k: tree[k] for k in keys + ("bias",)}
  ours = prune.global_magnitude(sub, amount)
  ref = torch_global_masks(kernels_of(sub), amount)
  assert sum(int((~m).sum()) for m in ref.values()) == round(amount * size(keys))
  for k, m in ref.items():
    np.testing.assert_array_equal(np.asarray(ours[k]), m, err_msg=k)
  assert np.asarray(ours["bias"]).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("amount", AMOUNTS)
def test_layerwise_magnitude_matches_torch_l1_unstructured(amount, seed):
  tree = distinct_tree(seed)
  ours = prune.layerwise_magnitude(tree, amount)
  ref = torch_layerwise_masks(kernels_of(tree), amount)
  for k, m in ref.items():
    assert int((~m).sum()) == round(amount * m.size), k
    np.testing.assert_array_equal(np.asarray(ours[k]), m, err_msg=k)
  assert np.asarray(ours["bias"]).all()


@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_global_magnitude_on_model_state_matches_torch_over_its_kernels(amount):
  """On a model's nnx.State the metadata picks the kernels (not the embedding, position
  table, biases or norms): torch pruning exactly those gives the same masks."""
  model = nnx.eval_shape(lambda: GPT(preset("tiny"), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  # distinct magnitudes across the whole state
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}
  values = distinct_tree(3, shapes)
  pure = jax.tree_util.tree_unflatten(jax.tree.structure(nnx.to_pure_dict(state)),
                                      [values[jax.tree_util.keystr(p)] for p, _ in flat])
  nnx.replace_by_pure_dict(state, pure)
  masks = prune.global_magnitude(state, amount)
  mflat = {jax.tree_util.keystr(p): np.asarray(m) for p, m in
           jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(masks))[0]}
  kernels = {k: values[k] for k in shapes if k.endswith("['kernel']")}
  assert kernels and len(kernels) < len(shapes)
  ref = torch_global_masks(kernels, amount)
  for k in shapes:
    if k in ref:
      np.testing.assert_array_equal(mflat[k], ref[k], err_msg=k)
    else:
      assert mflat[k].all(), k
