"""gptjax.compress.prune: exact counts against NumPy references, the prunable rule read from
logical axes, N:M groups, structured pruning checked against the unpruned model with the
same units zeroed, gradual pruning through AdamW with the masks checkpointed, and clear
errors. (PyTorch's own masks are compared in test_prune_vs_torch.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax.train.checkpoint import Checkpointer, abstract_like
from gptjax.compress import prune
from gptjax.config import VisionConfig, preset
from gptjax.model import GPT, VLM
# (The HAS_HEAD_DIM_FIELD / needs_head_dim xfail machinery is gone: ModelConfig.head_dim
# always exists now, so head pruning is always supported.)


# ----------------------------------------------------------------------------- helpers
def named_leaves(tree):
  """[(dotted name, np.ndarray)] in tree order (Variables looked through)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    keys = [str(k) for k in keys if k != "value"]
    out.append((".".join(keys), np.asarray(x)))
  return out


def is_kernel(name):
  """The test's own rule for the model trees: kernels are prunable, nothing else is."""
  return name.split(".")[-1] == "kernel"


def check_global(params, masks, a, prunable):
  p, mk = named_leaves(params), named_leaves(masks)
  assert [n for n, _ in p] == [n for n, _ in mk]
  for (name, x), (_, m) in zip(p, mk):
    assert m.dtype == np.bool_ and m.shape == x.shape, name
    if not prunable(name):
      assert m.all(), f"non-prunable {name} was masked"
  w = np.concatenate([np.abs(x).ravel() for n, x in p if prunable(n)])
  keep = np.concatenate([m.ravel() for n, m in mk if prunable(n)])
  # Was floor(a * n): the count is now torch's, round(a * n) (Python's round, half to even).
  assert (~keep).sum() == round(a * w.size)
  if 0 < (~keep).sum() < w.size:
    assert w[keep].min() >= w[~keep].max()


def random_tree(seed=0):
  """Plain nested dict/list pytree; values rounded to 1 decimal, so |w| has many exact ties.
  No metadata: every floating leaf with ndim >= 2 is a kernel (the embedding table too)."""
  r = np.random.default_rng(seed)
  q = lambda *s: np.round(r.normal(size=s), 1).astype(np.float32)
  return {
      "embed": {"embedding": q(50, 8)},
      "layers": [{"w": q(8, 16), "bias": q(16)}, {"w": q(16, 8), "bias": q(8)}],
      "attn": {"o": {"kernel": q(2, 4, 8)}},
      "conv": {"kernel": q(3, 3, 4, 8), "bias": q(8)},
      "norm": {"scale": q(8)},
  }


def tree_prunable(name):
  # Plain trees carry no metadata, so the embedding table is an ordinary 2-D kernel now (it
  # used to be excluded by the removed EMBEDDING_NAMES list); biases / scales are 1-D.
  return name.split(".")[-1] in ("w", "kernel", "embedding")


def tiny_cfg(**kw):
  return preset("tiny", **kw)


def vlm_cfg(**kw):
  return tiny_cfg(vision=VisionConfig(kind="cnn", image_size=8, cnn_channels=(4, 8), width=16),
                  **kw)


@functools.lru_cache(maxsize=None)
def make(cls, cfg, seed=0):
  """A model with random NumPy values everywhere (biases non-zero, norm scales ~1), built
  abstractly: eager or jitted init costs seconds of XLA compiles on CPU. Cached: no test
  mutates a model in place."""
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(model)
  r = np.random.default_rng(seed)

  def fill(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    fan_in = x.shape[0] if len(x.shape) == 2 else max(int(np.prod(x.shape[:-1])), 1)
    v = r.normal(size=x.shape) / np.sqrt(fan_in if len(x.shape) > 1 else 100.0)
    return jnp.asarray(v + (name == "scale"), x.dtype)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 200, size=(2, 12)), jnp.int32)
IMAGE = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 8, 8, 3)), jnp.float32)


def zeroed(model, edits):
  """A copy of ``model`` whose params have ``edits[(path...)] = fn(np array)`` applied."""
  graphdef, state = nnx.split(model)
  pure = jax.tree.map(np.array, nnx.to_pure_dict(state))
  for path, fn in edits.items():
    d = pure
    for k in path[:-1]:
      d = d[k]
    d[path[-1]] = fn(d[path[-1]].copy())
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return nnx.merge(graphdef, state)


def set_zero(index):
  def fn(x):
    x[index] = 0
    return x
  return fn


def np_scores(slices, score="l1"):
  if score == "l1":
    return sum(np.abs(s.astype(np.float64)).reshape(s.shape[0], -1).sum(1) for s in slices)
  return np.sqrt(sum((s.astype(np.float64) ** 2).reshape(s.shape[0], -1).sum(1) for s in slices))


def np_top(s, k):
  return np.sort(np.argsort(-s, kind="stable")[:k])


# ----------------------------------------------------------------- unstructured masks
@pytest.mark.parametrize("a", [0.3, 0.5, 0.9])
def test_global_magnitude_plain_tree_exact_count_with_ties(a):
  tree = random_tree()
  masks = prune.global_magnitude(tree, sparsity=a)
  assert jax.tree.structure(masks) == jax.tree.structure(tree)
  check_global(tree, masks, a, tree_prunable)
  # Was: the embedding's masks are all True (the name rule). Without metadata nothing is an
  # embedding: the table is a prunable kernel, and leaving it out is the caller's choice.
  assert prune.is_prunable(tree["embed"]["embedding"])
  assert not prune.is_prunable(tree["layers"][0]["bias"])
  no_embed = {k: v for k, v in tree.items() if k != "embed"}
  check_global(no_embed, prune.global_magnitude(no_embed, sparsity=a),
               a, lambda n: tree_prunable(n) and not n.endswith("embedding"))
  # deterministic, and apply_masks zeroes exactly the masked weights
  again = prune.global_magnitude(tree, sparsity=a)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), masks, again)
  pruned = prune.apply_masks(tree, masks)
  for (_, x), (_, m), (_, y) in zip(named_leaves(tree), named_leaves(masks), named_leaves(pruned)):
    np.testing.assert_array_equal(y, np.where(m, x, 0))


@pytest.mark.parametrize("a", [0.3, 0.5, 0.9])
def test_global_magnitude_nnx_state_of_gpt(a):
  params = nnx.state(make(GPT, tiny_cfg()), nnx.Param)
  masks = prune.global_magnitude(params, sparsity=a)
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  assert isinstance(masks["blocks"][0]["attn"]["q"]["kernel"], nnx.Param)
  check_global(params, masks, a, is_kernel)
  # Was: the whole pure-dict view gives the same masks (name rule == metadata rule). With no
  # name rule a plain dict's embeddings and 2-D q/k/v biases are kernels too, so the
  # caller passes the kernels only -- and then the masks are the same.
  kernels = {name: x for name, x in named_leaves(params) if is_kernel(name)}
  pure_masks = prune.global_magnitude(kernels, sparsity=a)
  for name, m in named_leaves(masks):
    if is_kernel(name):
      np.testing.assert_array_equal(m, pure_masks[name])
  pruned = prune.apply_masks(params, masks)
  assert pruned["embed"]["embedding"].get_metadata()["logical_axes"] == ("vocab", "embed")
  rep = prune.sparsity_report(pruned)
  n = sum(x.size for name, x in named_leaves(params) if is_kernel(name))
  assert rep["prunable"] == n and rep["zeros"] == round(a * n)  # was floor: torch's round now
  assert set(rep["kernels"]) == {name for name, _ in named_leaves(params) if is_kernel(name)}


def test_include_embeddings():
  # Was on the plain random_tree, whose embedding was found by name; embeddings are found by
  # their logical axes now ('vocab', 'position'), so this uses a model's nnx.State.
  params = nnx.state(make(GPT, tiny_cfg()), nnx.Param)
  masks = prune.global_magnitude(params, 0.5, include_embeddings=True)
  check_global(params, masks, 0.5,
               lambda n: is_kernel(n) or n.endswith("embedding") or n.endswith("table"))
  assert not np.asarray(masks["embed"]["embedding"][...]).all()
  assert not np.asarray(masks["positions"]["table"][...]).all()


@pytest.mark.parametrize("model_cfg", [
    ("gpt", dict(tie_embeddings=False)),
    ("vit", dict(vision=VisionConfig(kind="vit", image_size=8, patch_size=4, width=16, depth=1,
                                     num_heads=2, mlp_dim=32))),
    ("cnn", {}),
])
def test_prunable_rule_from_logical_axes(model_cfg):
  """Every model leaf is classified by its metadata alone: kernels prunable, the token
  table, untied head and both learned position tables embeddings, biases / norms neither."""
  kind, kw = model_cfg
  cfg = vlm_cfg(**kw) if kind == "cnn" else tiny_cfg(**kw)
  params = nnx.state(make(VLM if cfg.vision is not None else GPT, cfg), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  seen = set()
  for path, var in flat:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    leaf = name.split(".")[-1]
    embedding = leaf in ("embedding", "table", "pos") or name == "head.kernel"
    assert prune.is_embedding(var) == embedding, name
    assert prune.is_prunable(var) == (leaf == "kernel" and not embedding), name
    assert prune.is_prunable(var, include_embeddings=True) == (leaf == "kernel" or embedding), name
    if prune.is_prunable(var):
      want = 3 if "conv" in name or name.startswith("vision.out") else 2 if ".o." in name else 1
      assert prune.reduction_ndim(var) == want, name
    seen.add("embedding" if embedding else leaf)
  assert {"embedding", "kernel", "bias", "scale"} <= seen
  # Plain arrays: ndim >= 2 floating leaves are kernels reducing over all but the last dim.
  assert prune.is_prunable(np.zeros((4, 3), np.float32))
  assert not prune.is_prunable(np.zeros((4,), np.float32))
  assert not prune.is_prunable(np.zeros((4, 3), np.int32))
  assert [prune.reduction_ndim(np.zeros(s)) for s in [(4, 3), (2, 4, 8), (3, 3, 4, 8)]] == [1, 2, 3]


@pytest.mark.parametrize("a", [0.3, 0.9])
def test_layerwise_magnitude_exact_per_kernel(a):
  tree = random_tree(3)
  masks = prune.layerwise_magnitude(tree, a)
  for (name, x), (_, m) in zip(named_leaves(tree), named_leaves(masks)):
    if not tree_prunable(name):
      assert m.all()
      continue
    assert (~m).sum() == round(a * x.size), name  # was floor: torch's round now
    assert np.abs(x)[m].min() >= np.abs(x)[~m].max(), name


def test_num_pruned_rounds_half_to_even_like_torch():
  """round(s * n), Python's (torch's) rounding: ties go to the even count; a traced float32
  sparsity (the gradual schedule's) gets the same counts at the sparsities used here."""
  ties = [(0.25, 10, 2), (0.25, 6, 2), (0.5, 5, 2), (0.5, 7, 4), (0.3, 5, 2), (0.1, 5, 0)]
  traced = jax.jit(prune.num_pruned, static_argnums=1)
  for s, n, want in ties:
    assert prune.num_pruned(s, n) == want == round(s * n), (s, n)
    assert int(traced(jnp.float32(s), n)) == want, (s, n)
  ss, ns = [0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9], np.arange(1, 2000)
  grid = jax.jit(jax.vmap(jax.vmap(prune.num_pruned, (0, None)), (None, 0)))
  np.testing.assert_array_equal(grid(jnp.asarray(ss, jnp.float32), jnp.asarray(ns)),
                                [[round(s * int(n)) for s in ss] for n in ns])


def test_existing_masks_stay_pruned():
  tree = random_tree(4)
  m1 = prune.global_magnitude(tree, 0.3)
  # make pruned weights large: they must still count as pruned (ranked lowest)
  big = jax.tree.map(lambda x, m: np.where(m, x, 100.0).astype(x.dtype), tree, m1)
  m2 = prune.global_magnitude(big, 0.5, masks=m1)
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
    assert not np.any(np.asarray(b) & ~np.asarray(a))
  n = sum(x.size for name, x in named_leaves(tree) if tree_prunable(name))
  # was floor(0.5 * n): torch's round now (n counts the plain tree's embedding, see above)
  assert sum((~np.asarray(b)).sum() for b in jax.tree.leaves(m2)) == round(0.5 * n)


# ------------------------------------------------------------------------------- N:M
def nm_groups(name, x):
  """The test's reduction layout: (groups, 4, fan-out)."""
  last = name.split(".")
  if x.ndim == 4:
    r = int(np.prod(x.shape[:3]))
  elif x.ndim == 3 and last[-2] == "o":
    r = x.shape[0] * x.shape[1]
  else:
    r = x.shape[0]
  return x.reshape(r // 4, 4, -1) if r % 4 == 0 else None


@pytest.mark.parametrize("n", [2, 1])
def test_n_m_groups_along_reduction_axis(n):
  model = make(VLM, vlm_cfg())
  params = nnx.state(model, nnx.Param)
  masks = prune.n_m(params, n=n, m=4)
  checked = 0
  for (name, x), (_, mk) in zip(named_leaves(params), named_leaves(masks)):
    if not is_kernel(name) or name.endswith("embedding"):
      assert mk.all(), name
      continue
    g, gm = nm_groups(name, x), nm_groups(name, mk)
    if g is None:  # vision.convs.0: 3*3*3 = 27 is not divisible by 4 -> left dense
      assert name == "vision.convs.0.kernel" and mk.all()
      continue
    assert (gm.sum(axis=1) == n).all(), name
    a = np.abs(g)
    kept_min = np.where(gm, a, np.inf).min(axis=1)
    pruned_max = np.where(gm, -np.inf, a).max(axis=1)
    assert (kept_min >= pruned_max).all(), name
    checked += 1
  assert checked == 2 * 6 + 2 + 2  # decoder q,k,v,o,up,down x2; projector; conv1 + out
  with pytest.raises(ValueError, match="not divisible by m=4"):
    prune.n_m(params, n=2, m=4, on_indivisible="raise")


def test_n_m_plain_arrays_and_ties():
  x = np.ones((8, 3), np.float32)  # all ties: the lower indices of each group win
  mk = np.asarray(prune.n_m({"w": x}, 2, 4)["w"])
  np.testing.assert_array_equal(mk, np.tile(np.array([1, 1, 0, 0], bool)[:, None], (2, 3)))


# ----------------------------------------------------------------------- structured
@pytest.mark.parametrize("activation,unique", [("gelu", None), ("swiglu", 1)])
def test_prune_neurons_equals_zeroed_units(activation, unique):
  cfg = tiny_cfg(mlp_activation=activation, depth=3, num_unique_layers=unique)
  model = make(GPT, cfg)
  keep = 24
  new_cfg, new_params, kept = prune.prune_neurons(model, keep, return_indices=True)
  assert new_cfg.mlp_dim == keep and new_cfg.depth == 3
  edits = {}
  for b in range(cfg.num_unique_layers):
    mlp = model.blocks[b].mlp
    names = ["up"] + (["gate"] if activation == "swiglu" else [])
    slices = [np.asarray(getattr(mlp, n).kernel[...]).T for n in names]
    slices += [np.asarray(getattr(mlp, n).bias[...]) for n in names]
    slices.append(np.asarray(mlp.down.kernel[...]))
    np.testing.assert_array_equal(kept[b], np_top(np_scores(slices), keep))
    drop = np.setdiff1d(np.arange(cfg.mlp_dim), kept[b])
    for n in names:
      edits[("blocks", b, "mlp", n, "kernel")] = set_zero((slice(None), drop))
      edits[("blocks", b, "mlp", n, "bias")] = set_zero(drop)
    edits[("blocks", b, "mlp", "down", "kernel")] = set_zero(drop)
    assert new_params["blocks"][b]["mlp"]["up"]["kernel"].shape == (cfg.width, keep)
    assert new_params["blocks"][b]["mlp"]["down"]["kernel"].shape == (keep, cfg.width)
  small = prune.build_pruned(GPT, new_cfg, new_params)
  np.testing.assert_allclose(small(TOKENS), zeroed(model, edits)(TOKENS), rtol=1e-5, atol=1e-5)


def test_prune_channels_vlm_cnn_equals_zeroed_channels():
  cfg = vlm_cfg()
  model = make(VLM, cfg)
  new_cfg, new_params, kept = prune.prune_channels(model, (3, 5), return_indices=True)
  assert new_cfg.vision.cnn_channels == (3, 5)
  edits = {}
  convs = [model.vision.convs[0], model.vision.convs[1], model.vision.out]
  for j, c in enumerate(cfg.vision.cnn_channels):
    k, nk = np.asarray(convs[j].kernel[...]), np.asarray(convs[j + 1].kernel[...])
    if j:  # stages are scored in order: conv j only keeps the inputs stage j-1 kept
      k = k[:, :, kept[j - 1], :]
    s = np_scores([np.moveaxis(k, 3, 0), np.moveaxis(nk, 2, 0), np.asarray(convs[j].bias[...])])
    np.testing.assert_array_equal(kept[j], np_top(s, (3, 5)[j]))
    drop = np.setdiff1d(np.arange(c), kept[j])
    edits[("vision", "convs", j, "kernel")] = set_zero((Ellipsis, drop))
    edits[("vision", "convs", j, "bias")] = set_zero(drop)
  assert new_params["vision"]["convs"][1]["kernel"].shape == (3, 3, 3, 5)
  assert new_params["vision"]["out"]["kernel"].shape == (1, 1, 5, 16)
  small = prune.build_pruned(VLM, new_cfg, new_params)
  np.testing.assert_allclose(small(TOKENS, IMAGE), zeroed(model, edits)(TOKENS, IMAGE),
                             rtol=1e-5, atol=1e-5)
  # plain (cfg, pure dict) input gives the same arrays, as a plain dict
  cfg2, pure = prune.prune_channels((cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))), (3, 5))
  assert cfg2 == new_cfg and isinstance(pure, dict)
  for x, y in zip(jax.tree.leaves(pure), jax.tree.leaves(new_params)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kv,keep,unique,vision", [(None, 3, None, False), (2, 2, 1, False),
                                                   (2, 2, None, True)])
def test_prune_heads_equals_zeroed_heads(kv, keep, unique, vision):
  cfg = (vlm_cfg if vision else tiny_cfg)(num_kv_heads=kv, depth=2, num_unique_layers=unique)
  model = make(VLM if vision else GPT, cfg)
  dec = model.decoder if vision else model
  new_cfg, new_params, kept = prune.prune_heads(model, keep, return_indices=True)
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.width // cfg.num_heads
  assert new_cfg.num_heads == keep and new_cfg.head_dim == h
  assert new_cfg.num_kv_heads == (keep if kv is None else kv)
  pre = ("decoder",) if vision else ()
  edits = {}
  for b in range(cfg.num_unique_layers):
    at = dec.blocks[b].attn
    q, o = np.asarray(at.q.kernel[...]), np.asarray(at.o.kernel[...])
    slices = [np.moveaxis(q, 1, 0), o, np.asarray(at.q.bias[...])]
    if k == n:
      for m in (at.k, at.v):
        slices += [np.moveaxis(np.asarray(m.kernel[...]), 1, 0), np.asarray(m.bias[...])]
      ref = np_top(np_scores(slices), keep)
    else:  # per kv group
      s, g = np_scores(slices), n // k
      ref = np.concatenate([i * g + np_top(s[i * g:(i + 1) * g], keep // k) for i in range(k)])
    np.testing.assert_array_equal(kept[b], ref)
    drop = np.setdiff1d(np.arange(n), kept[b])
    base = pre + ("blocks", b, "attn")
    edits[base + ("q", "kernel")] = set_zero((slice(None), drop))
    edits[base + ("q", "bias")] = set_zero(drop)
    edits[base + ("o", "kernel")] = set_zero(drop)
    blk = new_params[pre[0]]["blocks"][b] if vision else new_params["blocks"][b]
    assert blk["attn"]["q"]["kernel"].shape == (cfg.width, keep, h)
    assert blk["attn"]["o"]["kernel"].shape == (keep, h, cfg.width)
    assert blk["attn"]["k"]["kernel"].shape == (cfg.width, new_cfg.num_kv_heads, h)
  small = prune.build_pruned(None, new_cfg, new_params)
  args = (TOKENS, IMAGE) if vision else (TOKENS,)
  np.testing.assert_allclose(small(*args), zeroed(model, edits)(*args), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- gradual pruning
def test_cubic_schedule_matches_formula():
  kw = dict(initial_sparsity=0.1, final_sparsity=0.7, begin_step=2, end_step=13, frequency=3)
  for t in range(20):
    if t < 2:
      ref = 0.0
    elif t >= 13:
      ref = 0.7
    else:
      tq = 2 + (t - 2) // 3 * 3
      ref = 0.7 + (0.1 - 0.7) * (1 - (tq - 2) / 11) ** 3
    np.testing.assert_allclose(float(prune.cubic_schedule(t, **kw)), ref, rtol=1e-6, atol=1e-7)
  assert float(jax.jit(lambda t: prune.cubic_schedule(t, **kw))(13)) == np.float32(0.7)


def test_gradual_pruning_adamw_and_checkpoint(tmp_path):
  cfg = tiny_cfg(depth=2)
  model = make(GPT, cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  sched = functools.partial(prune.cubic_schedule, final_sparsity=0.7, begin_step=2, end_step=12,
                            frequency=2)
  tx = prune.gradual_pruning(optax.adamw(1e-2, weight_decay=0.1), sched, "global")
  opt_state = tx.init(params)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(4, 17)), jnp.int32)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, o):
    updates, o = tx.update(jax.grad(loss)(p), o, p)
    return optax.apply_updates(p, updates), o

  n = sum(x.size for name, x in named_leaves(params) if is_kernel(name))
  prev = None
  for t in range(20):
    params, opt_state = step(params, opt_state)
    masks = prune.find_masks(opt_state)
    ml = named_leaves(masks)
    for (name, x), (_, mk) in zip(named_leaves(params), ml):
      assert (x[~mk] == 0).all(), (t, name)
      if not is_kernel(name):
        assert mk.all(), name
    if prev is not None:  # masks only shrink
      for (_, a), (_, b) in zip(prev, ml):
        assert not np.any(b & ~a)
    prev = ml
  pruned = sum((~mk).sum() for name, mk in prev if is_kernel(name))
  assert pruned == round(0.7 * n)  # was floor: torch's round now
  assert prune.sparsity_report(params)["zeros"] == round(0.7 * n)
  assert int(opt_state.count) == 20 and float(opt_state.sparsity) == np.float32(0.7)

  # the masks are part of opt_state: they survive the repo's Checkpointer
  state = {"params": params, "opt_state": opt_state}
  with Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False) as ck:
    assert ck.save(20, state)
    ck.wait()
    restored = ck.restore(abstract_like(state))
  got = prune.find_masks(restored["opt_state"])
  assert jax.tree.structure(got) == jax.tree.structure(masks)
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(got)):
    assert np.asarray(b).dtype == np.bool_
    np.testing.assert_array_equal(a, b)
  # and training on from the restored state keeps the pruned weights at zero
  p2, o2 = step(restored["params"], restored["opt_state"])
  for x, mk in zip(jax.tree.leaves(p2), jax.tree.leaves(prune.find_masks(o2))):
    assert (np.asarray(x)[~np.asarray(mk)] == 0).all()


def test_gradual_n_m_method():
  tree = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)}
  tx = prune.gradual_pruning(optax.sgd(0.1), 0.5, "n_m", n=2, m=4)
  o = tx.init(tree)
  u, o = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, tree), o, tree)
  new = np.asarray(optax.apply_updates(tree, u)["w"])
  assert ((new.reshape(2, 4, 4) != 0).sum(1) == 2).all()


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.5"])
def test_bad_sparsity(bad):
  tree = random_tree()
  for fn in (prune.global_magnitude, prune.layerwise_magnitude):
    with pytest.raises(ValueError, match="sparsity"):
      fn(tree, bad)


@pytest.mark.parametrize("n,m", [(5, 4), (0, 4), (2, 0)])
def test_bad_n_m(n, m):
  with pytest.raises(ValueError, match=rf"n={n}, m={m}"):
    prune.n_m(random_tree(), n, m)


def test_bad_structured_args():
  model = make(GPT, tiny_cfg())
  for bad in (0, 5, -1):
    with pytest.raises(ValueError, match=f"keep_heads={bad}"):
      prune.prune_heads(model, bad)
  with pytest.raises(ValueError, match="keep_heads=3.*multiple of num_kv_heads"):
    prune.prune_heads(model, 3)  # GQA with K=2
  with pytest.raises(ValueError, match="keep=0"):
    prune.prune_neurons(model, 0)
  with pytest.raises(ValueError, match="keep=65"):
    prune.prune_neurons(model, 65)
  with pytest.raises(ValueError, match="cnn vision encoder"):
    prune.prune_channels(model, 2)
  with pytest.raises(ValueError, match="method="):
    prune.gradual_pruning(optax.sgd(0.1), 0.5, "random")
  with pytest.raises(ValueError, match="final_sparsity"):
    prune.cubic_schedule(0, final_sparsity=1.0, begin_step=0, end_step=5)
