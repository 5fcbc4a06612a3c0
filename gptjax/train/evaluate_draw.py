"""Evaluation of the draw task: does what the decoder draws for a caption show it?

For ``draw.eval_examples`` records of a split, the decoder samples the G x G image codes of
the record's caption (``gptjax.tasks.drawing.sample_codes``, fixed seed), the run's image
tokenizer decodes them, and the independent shapes analyser (``shapes_analyser.matches``,
plain NumPy connected components, no learnt part) compares the picture with the record:
``draw_colors`` / ``draw_count`` / ``draw_color_and_count`` / ``draw_all`` are the rates of
single samples that are right in that respect. With ``draw.best_of`` K > 1, K samples are
drawn per prompt (the rates above are over all of them) and the model itself picks one
(``draw_best_of``: the highest caption likelihood given the drawing); ``draw_best_*`` are the
same rates for the picked drawings, which the png shows. ``codes_palette_acc`` /
``codes_mae``: the tokenizer's own reconstruction of the split's images (an upper bound on
what drawing can reach). ``image_text`` data have no analyser: only the tokenizer's error
is reported.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import numpy as np

from gptjax.tasks import image_codes as ic
from gptjax.tasks import shapes_analyser as sa
from gptjax.tasks.drawing import draw_prompt, draw_tokens, sample_codes
from gptjax.tasks.match import paired_scores
from gptjax.train.config import tokenizer_for
from gptjax.train.data import load_split
from gptjax.train.metrics import save_image_grid

log = logging.getLogger("gptjax")


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def draw_images(model, c, captions: list[str], codes_model: ic.ImageCodes, *, seed: int = 0,
                temperature: Optional[float] = None, top_k: Optional[int] = None,
                top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
                batch_size: Optional[int] = None, tokenizer=None) -> np.ndarray:
  """uint8 (N, H, W, C) images the decoder draws for ``captions`` (settings default to the
  config's ``draw`` section; ``top_k`` 0, ``top_p`` 1 and ``cfg_scale`` 0 mean off;
  ``tokenizer``: default the one the config names)."""
  d = c.draw
  tok = tokenizer or tokenizer_for(c)
  layout = draw_tokens(tok.vocab_size, codes_model.config.codebook_size)
  temperature = d.temperature if temperature is None else temperature
  top_k = d.top_k if top_k is None else top_k
  top_p = d.get("top_p", 1.0) if top_p is None else top_p
  cfg_scale = d.cfg_scale if cfg_scale is None else cfg_scale
  bs = batch_size or c.eval.batch_size
  cfg = codes_model.config
  uncond = draw_prompt(tok, "", layout)
  out = []
  for lo in range(0, len(captions), bs):
    chunk = captions[lo:lo + bs]
    prompts = [draw_prompt(tok, t, layout) for t in chunk]
    image = None
    if getattr(model.config, "vision", None) is not None:  # draw rows trained on a blank image
      image = np.zeros((len(chunk), cfg.image_size, cfg.image_size, cfg.image_channels),
                       np.float32)
    codes = sample_codes(model, prompts, layout, cfg.num_codes, temperature=float(temperature),
                         top_k=int(top_k) or None, top_p=float(top_p) if top_p < 1 else None,
                         cfg_scale=float(cfg_scale) or None,
                         uncond_ids=uncond, image=image, seed=seed + lo)
    out.append(ic.decode(codes_model, codes))
  return np.concatenate(out)


class BestOf(NamedTuple):
  """What ``draw_best_of`` returns."""
  images: np.ndarray  # (N, H, W, C) uint8: the kept drawing of each caption
  candidates: np.ndarray  # (N, K, H, W, C) uint8: every sample
  scores: Optional[np.ndarray]  # (N, K) the model's caption likelihoods; None when K = 1


def draw_best_of(model, c, captions: list[str], codes_model: ic.ImageCodes,
                 best_of: Optional[int] = None, *, tokenizer=None, **sample_kw) -> BestOf:
  """Best-of-K drawing: K = ``best_of`` (default ``draw.best_of``) samples per caption, and
  the one the same model scores highest as that caption's image (``paired_scores``: the
  mean log-likelihood of the caption given the drawing, the generative matching score).

  Returns a ``BestOf`` (kept images, all candidates, their scores). The choice uses nothing
  but the model (no analyser, no labels), as CLIP reranking picks among DALL-E's samples: a
  small decoder's single samples often bind a colour to the wrong shape or add one, while
  its captioner reads drawings well, so among K samples it finds a right one far more
  often than a single sample is right (measured in BENCHMARKS.md). With K = 1 this is
  ``draw_images``. ``sample_kw``: ``draw_images``' seed / temperature / top_k / top_p /
  cfg_scale / batch_size."""
  k = int(c.draw.get("best_of", 1) if best_of is None else best_of)
  if k < 1:
    raise ValueError(f"best_of={k} is invalid: must be >= 1 (1: a single sample)")
  tok = tokenizer or tokenizer_for(c)
  repeated = [t for t in captions for _ in range(k)]
  flat = draw_images(model, c, repeated, codes_model, tokenizer=tok, **sample_kw)
  cands = flat.reshape(len(captions), k, *flat.shape[1:])
  if k == 1:
    return BestOf(cands[:, 0], cands, None)
  scores = paired_scores(model, flat, repeated, tok).reshape(len(captions), k)
  return BestOf(cands[np.arange(len(captions)), scores.argmax(axis=1)], cands, scores)


def _rates(matched: list[dict], prefix: str) -> dict:
  return {f"{prefix}colors": float(np.mean([x["colors"] for x in matched])),
          f"{prefix}count": float(np.mean([x["count"] for x in matched])),
          f"{prefix}color_and_count": float(np.mean([x["colors"] and x["count"]
                                                      for x in matched])),
          f"{prefix}all": float(np.mean([x["all"] for x in matched]))}


def draw_metrics(model, c, split: str, codes_model: ic.ImageCodes, *, source=None,
                 png: Optional[str] = None) -> dict:
  """The draw rates and the tokenizer's reconstruction on ``split`` (module docstring);
  ``png``: also a grid of the first ``draw.samples`` drawings with their prompts there."""
  src = source if source is not None else load_split(c, split)
  n = min(int(c.draw.eval_examples), len(src))
  records = [src[i] for i in range(n)]
  images = np.stack([np.asarray(src[i][c.data.image_key])
                     for i in range(min(len(src), 1024))])
  recon = ic.reconstruction_error(codes_model, images)
  shapes = c.data.name == "shapes"
  out = {"codes_mae": recon["mean_abs_error"]}
  if shapes:
    out["codes_palette_acc"] = recon["palette_accuracy"]
  if n == 0:
    return out
  captions = [_text(r[c.data.caption_key]) for r in records]
  chosen, cands, scores = draw_best_of(model, c, captions, codes_model, seed=c.seed)
  if shapes:
    read = [[sa.matches(img, r) for img in per] for r, per in zip(records, cands)]
    out.update(_rates([m for row in read for m in row], "draw_"))
    if scores is not None:  # the kept drawings' readings: no second analysis
      out.update(_rates([row[k] for row, k in zip(read, scores.argmax(axis=1))], "draw_best_"))
  else:
    log.info("draw: data.name=%r has no image analyser; only the tokenizer's error is "
             "reported", c.data.name)
  if png and c.draw.samples > 0:
    save_drawings_png(chosen[:c.draw.samples], captions[:c.draw.samples], png)
  return out


def save_drawings_png(images: np.ndarray, captions: list[str], path: str) -> Optional[str]:
  """A grid of drawings titled with their prompts; None without matplotlib."""
  return save_image_grid(images, [cap or "(unconditional)" for cap in captions], path,
                         cell=(2.6, 2.9))
