"""Image-text matching and retrieval (gptjax.tasks.match / retrieval, the SigLIP head).

References are independent of the code under test: a float64 NumPy transcription of the
SigLIP loss, brute-force sorting for recall@k, and per-pair scoring through the plain
``model(tokens, image)`` forward for the batched generative scorer. One tiny VLM is trained
jointly (LM + contrastive) through the real train step on a synthetic captioned set, once
per module.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax import sharding as shd
from gptjax.batch import caption_positives
from gptjax.config import ModelConfig, VisionConfig, preset
from gptjax.data.pipeline import CAPTION_PROMPT, make_pipeline
from gptjax.data.tokenizers import make_tokenizer
from gptjax.layers.contrastive import ContrastiveHead, siglip_loss
from gptjax.model import from_config
from gptjax.tasks.match import generative_scores, match, paired_scores
from gptjax.tasks.retrieval import build_gallery, recall_at_k, retrieval_metrics
from gptjax.train.state import create_train_state
from gptjax.train.step import make_train_step

TOK = make_tokenizer("shapes")  # word tokens: "a red square" is 3 tokens, rows stay short
# As small as a VLM gets (compiling dominates on CPU): 8 px, one conv + pool -> 16 tokens.
VISION = VisionConfig(kind="cnn", image_size=8, cnn_channels=(8,), width=16)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "white": (255, 255, 255)}
KINDS = {"red": "square", "green": "circle", "blue": "triangle", "white": "square"}


def _records():
  """One solid-colour image per colour, plus a second, half-filled red image with the same
  caption as the first (identical captions of different images: positives, not negatives)."""
  out = []
  for name, rgb in COLOURS.items():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:] = rgb
    out.append({"image": img, "caption": f"a {name} {KINDS[name]}"})
  half = np.zeros((8, 8, 3), np.uint8)
  half[:4] = COLOURS["red"]
  out.append({"image": half, "caption": "a red square"})
  return out


RECORDS = _records()
CAPTIONS = list(dict.fromkeys(r["caption"] for r in RECORDS))  # 4 distinct


def _cfg(**kw) -> ModelConfig:
  return preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=16, vision=VISION, depth=1,
                num_heads=2, num_kv_heads=None, mlp_dim=64, **kw)


# ------------------------------------------------------------------------- SigLIP loss


def _siglip_reference(x, y, pos, t, b, valid):
  total, n = 0.0, 0
  for i in range(len(x)):
    for j in range(len(y)):
      if not (valid[i] and valid[j]):
        continue
      z = 1.0 if pos[i][j] else -1.0
      logit = t * float(np.dot(x[i], y[j])) + b
      total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
      n += 1
  return total / n


def test_siglip_loss_matches_numpy_with_duplicate_captions():
  rng = np.random.default_rng(0)
  head = ContrastiveHead(12, 6, rngs=nnx.Rngs(0))
  x = head.image(jnp.asarray(rng.normal(size=(7, 12)), jnp.float32))
  y = head.text(jnp.asarray(rng.normal(size=(7, 12)), jnp.float32))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(x, np.float64), axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y, np.float64), axis=1), 1.0, atol=1e-5)
  # Captions as right-padded ids: rows 0/3/5 share one, 1/4 another; row 6 has none; row 2
  # has row 0's tokens as a prefix (different length: a negative); padding differs per row.
  caps = [[5, 6, 7], [8, 9], [5, 6], [5, 6, 7], [8, 9], [5, 6, 7], []]
  ids = np.array([c + [rng.integers(0, 50)] * (4 - len(c)) for c in caps], np.int32)
  lens = np.array([len(c) for c in caps], np.int32)
  pos = np.asarray(caption_positives(jnp.asarray(ids), jnp.asarray(lens)))
  want_pos = [[tuple(a) == tuple(b) for b in caps] for a in caps]
  np.testing.assert_array_equal(pos[:6, :6], np.array(want_pos)[:6, :6])
  valid = lens > 0
  xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
  for log_t, b in ((math.log(10.0), -10.0), (0.7, 1.5)):
    got = float(siglip_loss(x, y, jnp.asarray(pos), jnp.float32(log_t), jnp.float32(b),
                            jnp.asarray(valid)))
    want = _siglip_reference(xn, yn, want_pos, math.exp(log_t), b, valid)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # The head's initial temperature and bias are SigLIP's: t = 10, b = -10.
  assert math.isclose(math.exp(float(head.log_temperature[...])), 10.0, rel_tol=1e-6)
  assert float(head.bias[...]) == -10.0


# --------------------------------------------------------------------------- recall@k


def _recall_brute(scores, hits, k):
  """Sort each query's items by score, ties broken *against* the query (non-hits first),
  and look for a hit among the first k."""
  ok = []
  for s, h in zip(scores, hits):
    order = np.lexsort((h.astype(int), -s))  # primary -score, then non-hits before hits
    ok.append(bool(h[order[:k]].any()))
  return float(np.mean(ok))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  n, m = 13, 9
  scores = rng.integers(0, 4, size=(n, m)).astype(np.float32)  # few values: many ties
  hits = rng.random((n, m)) < 0.2
  hits[np.arange(n), rng.integers(0, m, n)] = True  # every image has a hit
  hits[rng.integers(0, n, m), np.arange(m)] = True  # every text has a hit
  got = recall_at_k(scores, hits, ks=(1, 2, 5, 10))
  for k in (1, 2, 5, 10):
    assert got[f"i2t_r{k}"] == pytest.approx(_recall_brute(scores, hits, k))
    assert got[f"t2i_r{k}"] == pytest.approx(_recall_brute(scores.T, hits.T, k))
  # All-equal scores: ties count against the query, so nothing is found at k=1 unless an
  # item's only competitors are hits.
  flat = recall_at_k(np.zeros((3, 3)), np.eye(3, dtype=bool), ks=(1, 3))
  assert flat["i2t_r1"] == 0.0 and flat["i2t_r3"] == 1.0
  with pytest.raises(ValueError, match="hit_matrix"):
    recall_at_k(np.zeros((2, 2)), np.array([[True, False], [False, False]]))


# --------------------------------------------------------------- the trained tiny VLM


class Trained:
  """A tiny VLM with a contrastive head, trained jointly (LM + 1.0 x SigLIP) for STEPS
  steps of batch 8 from the vqa pipeline (caption rows, captions emitted)."""
  STEPS = 120

  def __init__(self):
    cfg = _cfg(contrastive_dim=16)
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = optax.adam(3e-3)
    graphdef, rest, state, _ = create_train_state(cfg, tx, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, rest, tx, contrastive_weight=1.0))
    pipe = make_pipeline(RECORDS, task="vqa", batch_size=8, seed=0, prompt_len=4,
                         target_len=5, tokenizer=TOK, captions=True)
    self.first_batch = None
    self.closs, self.lm = [], []
    for i in range(self.STEPS):
      batch = next(pipe)
      if self.first_batch is None:
        self.first_batch = batch
      state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()
                                    if k not in ("prompt", "is_caption")})
      self.closs.append(float(metrics["contrastive_loss"]))
      self.lm.append(float(metrics["lm_loss"]))
    self.model = nnx.merge(graphdef, state.params, rest)
    self.model.eval()
    self.cfg = cfg


@pytest.fixture(scope="module")
def trained():
  return Trained()


def test_joint_training_lowers_the_contrastive_loss(trained):
  b = trained.first_batch
  assert b["caption_ids"].shape == (8, 5) and b["caption_len"].shape == (8,)
  assert TOK.decode(b["caption_ids"][0][:b["caption_len"][0]]) in CAPTIONS
  first, last = np.mean(trained.closs[:10]), np.mean(trained.closs[-10:])
  print(f"contrastive loss {first:.4f} -> {last:.4f}; lm {trained.lm[0]:.3f} -> "
        f"{trained.lm[-1]:.3f}")
  assert np.isfinite(trained.closs).all()
  assert last < 0.5 * first, (first, last)
  assert trained.lm[-1] < 0.5 * trained.lm[0]


def test_trained_model_picks_the_true_caption(trained):
  images = np.stack([r["image"] for r in RECORDS])
  rng = np.random.default_rng(0)
  order = rng.permutation(len(CAPTIONS))
  texts = [CAPTIONS[i] for i in order]  # shuffled candidates
  truth = [texts.index(r["caption"]) for r in RECORDS]
  for method in ("generative", "contrastive"):
    scores = match(trained.model, images, texts, method=method, tokenizer=TOK)
    assert scores.shape == (len(RECORDS), len(texts))
    print(method, np.round(scores, 3))
    np.testing.assert_array_equal(scores.argmax(axis=1), truth, err_msg=method)
  # The same through the gallery of a split: every image's caption ranks first.
  gallery = build_gallery(RECORDS)
  assert len(gallery.texts) == 4 and gallery.hits.sum() == 5
  m = retrieval_metrics(trained.model, gallery, method="generative", tokenizer=TOK)
  assert m["i2t_r1"] == 1.0 and m["gallery_size"] == 5 and m["distinct_captions"] == 4
  # And as the training eval reports it (eval.retrieval on, a VLM on captioned vqa data).
  from gptjax.train.config import base_config
  from gptjax.train.evaluate import retrieval_eval, wants_retrieval
  c = base_config()
  c.data.tokenizer = "shapes"
  assert not wants_retrieval(trained.model, c, RECORDS)  # off by default
  c.eval.retrieval = True
  assert wants_retrieval(trained.model, c, RECORDS)
  ev = retrieval_eval(trained.model, c, RECORDS)
  assert ev["retrieval_images"] == 5 and ev["retrieval_captions"] == 4
  assert ev["gen_i2t_r1"] == 1.0 and ev["con_i2t_r1"] == 1.0 and "con_t2i_r10" in ev


def _one_pair_score(model, image, text):
  """Mean log-probability of ``text <eos>`` after ``<bos> caption: <sep>``, one image and one
  caption through the plain forward (no padding, no tiling), in float64."""
  prompt = TOK.encode(CAPTION_PROMPT, bos=True) + [TOK.sep_id]
  target = TOK.encode(text) + [TOK.eos_id]
  seq = np.array(prompt + target, np.int32)
  logits = model(jnp.asarray(seq[None, :-1]), jnp.asarray(image[None], jnp.float32) / 255.0)
  logits = np.asarray(logits[0], np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  at = np.arange(len(prompt) - 1, len(seq) - 1)  # positions predicting the target tokens
  return float(np.mean(logp[at, seq[at + 1]]))


def test_batched_generative_scores_equal_one_pair_at_a_time(trained):
  images = np.stack([r["image"] for r in RECORDS[:3]])
  texts = CAPTIONS + ["a purple blob"]  # a longer one: padded in the batched rows
  want = np.array([[_one_pair_score(trained.model, im, t) for t in texts] for im in images])
  # Blocks of 3 rows: texts split 3 + 2 (the last block padded), one image per block.
  got = generative_scores(trained.model, images, texts, TOK, max_rows=3)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(generative_scores(trained.model, images, texts, TOK), want,
                             atol=2e-5, rtol=1e-5)


def test_paired_scores_equal_one_pair_at_a_time(trained):
  """Each image against its own text (what best-of-K drawing ranks by): the per-pair forward,
  in blocks of 2 (the last one padded), and longer texts padded within a block."""
  images = np.stack([r["image"] for r in RECORDS])
  texts = [CAPTIONS[1], CAPTIONS[0], "a purple blob", CAPTIONS[2], CAPTIONS[3]]  # all wrong
  want = np.array([_one_pair_score(trained.model, im, t) for im, t in zip(images, texts)])
  for block in (2, 64):
    got = paired_scores(trained.model, images, texts, TOK, block=block)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f"block={block}")
  # Higher is better: each image's own caption outscores the wrong one above.
  own = paired_scores(trained.model, images, [r["caption"] for r in RECORDS], TOK)
  assert (own > want).all(), (own, want)
  with pytest.raises(ValueError, match="one text per image: got 5 images and 4 texts"):
    paired_scores(trained.model, images, texts[:4], TOK)


# ------------------------------------------------------------------- errors, validation


def test_bad_method_and_missing_head_are_named():
  model = nnx.eval_shape(lambda: from_config(_cfg()))  # no head; abstract: the errors come first
  images = np.stack([RECORDS[0]["image"]])
  with pytest.raises(ValueError, match="method='cosine' is invalid"):
    match(model, images, ["a"], method="cosine")
  with pytest.raises(ValueError, match="contrastive_dim"):
    match(model, images, ["a"], method="contrastive")
  with pytest.raises(ValueError, match="texts"):
    match(model, images, "a red square")
  with pytest.raises(ValueError, match="contrastive_dim=4 is invalid"):
    ModelConfig(contrastive_dim=4)  # no vision


def test_contrastive_weight_without_head_is_rejected():
  from gptjax.train.config import base_config, model_config, validate, vision_section
  c = base_config()
  c.model.vision = vision_section(**{k: getattr(VISION, k) for k in
                                     ("kind", "image_size", "cnn_channels", "width")})
  c.model.max_seq_len = 128
  c.train.contrastive_weight = 0.5
  with pytest.raises(ValueError, match=r"train\.contrastive_weight.*model\.contrastive_dim"):
    validate(c)
  c.model.contrastive_dim = 8
  assert validate(c).contrastive_dim == 8
  # A saved config of a run from before the field existed still builds (the default 0).
  d = c.to_dict()
  del d["model"]["contrastive_dim"]
  import ml_collections
  assert model_config(ml_collections.ConfigDict(d)).contrastive_dim == 0


def test_retrieve_cli_rejects_a_bad_workdir(tmp_path, capsys):
  from gptjax.tasks.retrieve import main
  assert main(["--workdir", str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "config.json" in err and "\n" not in err


def test_joint_loss_encodes_once_and_equals_the_separate_losses(trained, monkeypatch):
  """joint_loss_sums shares one image encoding between the LM and contrastive losses; its
  value equals the two losses computed apart (each encoding the image itself)."""
  from gptjax.batch import contrastive_loss, joint_loss_sums, loss_sums
  batch = {k: jnp.asarray(v) for k, v in trained.first_batch.items()
           if k not in ("prompt", "is_caption")}
  total, count, parts = joint_loss_sums(trained.model, batch, 0.3)
  lm_sum, n = loss_sums(trained.model, batch)
  closs = contrastive_loss(trained.model, batch)
  np.testing.assert_allclose(float(count), float(n))
  np.testing.assert_allclose(float(parts["lm_loss"]), float(lm_sum), rtol=1e-5)
  np.testing.assert_allclose(float(parts["contrastive_loss"]), float(closs * n), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(lm_sum + 0.3 * closs * n), rtol=1e-5)
  # ... and the vision tower runs once in the traced program, not twice.
  calls = []
  encode = type(trained.model).encode_image

  def counting(self, image):
    calls.append(image.shape)
    return encode(self, image)

  monkeypatch.setattr(type(trained.model), "encode_image", counting)
  jax.eval_shape(lambda b: joint_loss_sums(trained.model, b, 0.3), batch)
  assert len(calls) == 1, calls


def test_quantized_model_scores_through_call_and_refuses_contrastive(trained):
  """A qwix int8 model computes only inside ``__call__``: generative scores go through it
  (equal to its own one-pair-at-a-time forward), the contrastive method is refused by name."""
  pytest.importorskip("qwix")
  from gptjax.compress.quantize import ptq_int8
  from gptjax.tasks.match import through_call_only
  images = np.stack([r["image"] for r in RECORDS[:2]])
  q = ptq_int8(trained.model, [{k: trained.first_batch[k] for k in ("inputs", "image",
                                                                  "segment_ids", "positions")}],
               activations=False)
  assert through_call_only(q) and not through_call_only(trained.model)
  want = np.array([[_one_pair_score(q, im, t) for t in CAPTIONS] for im in images])
  np.testing.assert_allclose(generative_scores(q, images, CAPTIONS, TOK), want,
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(paired_scores(q, images, CAPTIONS[:2], TOK),
                             [want[0, 0], want[1, 1]], atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="method='contrastive' is not available"):
    match(q, images, CAPTIONS, method="contrastive", tokenizer=TOK)
