"""The training eval's caption metrics: greedy decodes scored by exact match, corpus BLEU-4
and CIDEr-D, checked against coco-caption's own scorers (pycocoevalcap) on the same text."""
import numpy as np
import pytest

import gptjax.train.evaluate as ev
from gptjax import sharding as shd
from gptjax.batch import batch_shardings
from gptjax.data.tokenizers import ByteTokenizer

TRUTHS = ["a red circle left of a blue square", "two green triangles", "a white square",
          "a purple circle", "a yellow triangle right of a red circle", "three blue squares",
          "a green circle", "a red square left of a white triangle"]
PREDICTIONS = ["a red circle left of a blue square", "two green squares", "a white square",
               "a purple triangle", "a yellow triangle left of a red circle", "blue squares",
               "a green circle", "a red square"]


def test_decode_accuracy_reports_bleu_and_cider_like_coco(monkeypatch):
  pycoco = pytest.importorskip("pycocoevalcap.bleu.bleu")
  from pycocoevalcap.cider.cider import Cider
  tok = ByteTokenizer()
  b, width = len(TRUTHS), 48
  targets = np.zeros((b, width), np.int32)
  mask = np.zeros((b, width), np.float32)
  outputs = np.full((b, width), tok.eos_id, np.int32)
  for i, (t, p) in enumerate(zip(TRUTHS, PREDICTIONS)):
    ids, pids = tok.encode(t), tok.encode(p)
    targets[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    outputs[i, :len(pids)] = pids
  batch = dict(inputs=np.ones((b, width), np.int32), targets=targets, loss_mask=mask,
               prompt=np.ones((b, 4), np.int32), is_caption=np.ones(b, np.int32))
  # The model's decoding is not under test: a stand-in returns the predictions' tokens.
  monkeypatch.setattr(ev, "generate", lambda model, prompt, n, **kw: outputs[:, :n])
  metrics, samples = ev.decode_accuracy(None, [batch], batch_shardings(shd.make_mesh()),
                                        max_new_tokens=width, max_examples=b, tokenizer=tok)
  assert [s.prediction for s in samples] == PREDICTIONS
  assert metrics["caption_exact_match"] == pytest.approx(3 / 8)
  gts = {i: [t] for i, t in enumerate(TRUTHS)}
  res = {i: [p] for i, p in enumerate(PREDICTIONS)}
  bleu, _ = pycoco.Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  assert metrics["caption_bleu4"] == pytest.approx(bleu[3], rel=1e-9)
  assert metrics["caption_cider"] == pytest.approx(cider, rel=1e-9)
  assert 0 < metrics["caption_bleu4"] < 1
