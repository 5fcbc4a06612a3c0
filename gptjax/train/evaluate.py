"""Evaluation: loss / perplexity over a split, and greedy-decoded caption exact-match and
VQA answer accuracy (the answer string must equal the reference exactly).

``evaluate(model, config, split)`` is the one entry point: the trainer (periodic and final
eval), the compression recipe (every stage) and the benchmarks call it, so every number
called "test loss" or "VQA accuracy" is measured the same way.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional

import jax
import numpy as np
from flax import nnx

from gptjax import sharding as shd
from gptjax.batch import batch_shardings, global_batch, image_to_float, loss_sums, model_batch
from gptjax.data.tokenizers import ByteTokenizer
from gptjax.generate import generate
from gptjax.tasks.caption_metrics import caption_scores
from gptjax.tasks.match import through_call_only
from gptjax.tasks.retrieval import build_gallery, retrieval_metrics
from gptjax.train.config import tokenizer_for
from gptjax.train.data import load_split, pipeline_for
from gptjax.train.evaluate_draw import draw_metrics
from gptjax.train.metrics import save_image_grid


def _local_rows(x: jax.Array, sharding) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local input order
  (the inverse of ``jax.make_array_from_process_local_data``)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, sharding.mesh, sharding.spec))


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(values)).sum(0)


def eval_loss(eval_step: Callable, params, batches: Iterable[dict], shardings: dict,
              max_batches: Optional[int] = None) -> dict:
  """Token-weighted mean cross-entropy and perplexity over (up to) ``max_batches`` batches."""
  total, count = 0.0, 0.0
  for i, local in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    t, c = eval_step(params, global_batch(local, shardings))
    total, count = total + float(t), count + float(c)
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@nnx.jit
def _loss_sums(model, batch):
  return loss_sums(model, model_batch(batch))


def evaluate(model: nnx.Module, c, split: str, *, mesh=None, source=None,
             decode_examples: Optional[int] = None,
             max_batches: Optional[int] = None, image_codes=None,
             draw_png: Optional[str] = None) -> tuple[dict, list["Sample"]]:
  """Metrics of ``model`` (a GPT or VLM, in eval mode) on ``split`` of config ``c``'s data.

  Loss and perplexity over up to ``max_batches`` (default ``eval.max_batches``) batches of
  ``eval.batch_size``; for vqa data also greedy-decoded caption exact match and VQA accuracy
  over ``decode_examples`` (default ``eval.decode_examples``) rows. ``mesh``: where the
  model's arrays live (default: the first device); ``source``: an already opened split.
  For a VLM on captioned data (``eval.retrieval``) also image<->text retrieval recall@1/5/10
  over a gallery of ``eval.retrieval_examples`` images (``retrieval_eval``).
  With ``draw.enabled`` and the run's ``image_codes`` tokenizer, also the draw metrics
  (``gptjax.train.evaluate_draw.draw_metrics``; ``draw_png``: a grid of drawings there).
  Returns (metrics, decoded samples).
  """
  mesh = mesh if mesh is not None else shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  shardings = batch_shardings(mesh)
  src = source if source is not None else load_split(c, split)
  bs = c.eval.batch_size
  max_batches = c.eval.max_batches if max_batches is None else max_batches
  decode_examples = c.eval.decode_examples if decode_examples is None else decode_examples
  model.eval()
  out = eval_loss(lambda _, b: _loss_sums(model, b), None,
                  pipeline_for(c, src, train=False, batch_size=bs), shardings,
                  max_batches=max_batches)
  samples: list[Sample] = []
  if c.data.task == "vqa" and decode_examples > 0:
    acc, samples = decode_accuracy(
        model, pipeline_for(c, src, train=False, batch_size=bs), shardings,
        max_new_tokens=c.data.target_len, max_examples=decode_examples,
        tokenizer=tokenizer_for(c))
    out.update(acc)
  if wants_retrieval(model, c, src):
    out.update(retrieval_eval(model, c, src))
  if image_codes is not None and c.get("draw") is not None and c.draw.enabled:
    out.update(draw_metrics(model, c, split, image_codes, source=src, png=draw_png))
  return out, samples


def wants_retrieval(model: nnx.Module, c, source) -> bool:
  """Retrieval runs for a VLM on captioned vqa data with ``eval.retrieval`` and
  ``eval.retrieval_examples`` > 0, in a single-process job (the gallery is scored on one
  host)."""
  return (c.data.task == "vqa" and bool(c.eval.get("retrieval", False))
          and c.eval.get("retrieval_examples", 0) > 0 and hasattr(model, "encode_image")
          and jax.process_count() == 1 and len(source) > 0
          and c.data.caption_key in source[0] and c.data.image_key in source[0])


def retrieval_eval(model: nnx.Module, c, source) -> dict:
  """Image<->text recall@1/5/10 (``gptjax.tasks.retrieval``) on the first
  ``eval.retrieval_examples`` images of ``source`` and their distinct captions: ``gen_*``
  by caption likelihood (images x captions decoder rows), ``con_*`` by the contrastive head
  when the model has one; plus the gallery's size and distinct-caption count."""
  gallery = build_gallery(source, limit=c.eval.retrieval_examples,
                          caption_key=c.data.caption_key, image_key=c.data.image_key)
  methods = {"gen": "generative"}
  if getattr(model, "contrastive", None) is not None and not through_call_only(model):
    methods["con"] = "contrastive"
  out = {"retrieval_images": float(len(gallery.images)),
         "retrieval_captions": float(len(gallery.texts))}
  for prefix, method in methods.items():
    m = retrieval_metrics(model, gallery, method=method, tokenizer=tokenizer_for(c))
    out.update({f"{prefix}_{k}": v for k, v in m.items() if k.startswith(("i2t", "t2i"))})
  return out


def text_samples(model: nnx.Module, c, split: str, *, source=None, n: int = 3,
                 prompt_tokens: int = 16, max_new_tokens: int = 64, seed: int = 0) -> list[str]:
  """``n`` sampled continuations (temperature 0.8, top-k 40) of the first ``prompt_tokens``
  of ``split``'s first windows, decoded with the run's tokenizer as ``prompt`` + text: what
  a text LM run prints at the end, as a VQA run prints answers."""
  tok = tokenizer_for(c)
  src = source if source is not None else load_split(c, split)
  batch = next(iter(pipeline_for(c, src, train=False, batch_size=n)), None)
  if batch is None:  # fewer than n windows in the split
    return []
  prompt = np.asarray(batch["inputs"])[:, :prompt_tokens]
  room = c.model.max_seq_len - prompt_tokens if c.model.position == "learned" else max_new_tokens
  out = np.asarray(generate(model, prompt, max(1, min(max_new_tokens, room)), temperature=0.8,
                            top_k=min(40, tok.vocab_size), seed=seed, stop_token=tok.eos_id))
  return [tok.decode(p, stop_at_eos=False) + " ▸ " + tok.decode(o) for p, o in zip(prompt, out)]


@dataclasses.dataclass
class Sample:
  prompt: str
  prediction: str
  truth: str
  is_caption: bool
  image: Optional[np.ndarray] = None


def decode_accuracy(model: nnx.Module, batches: Iterable[dict], shardings: dict, *,
                    max_new_tokens: int, max_examples: int,
                    tokenizer: Optional[ByteTokenizer] = None) -> tuple[dict, list[Sample]]:
  """Greedy-decode the target of each vqa-task row; exact match against the reference
  (compared as text, decoded with ``tokenizer``, default bytes)."""
  tok = tokenizer or ByteTokenizer()
  samples: list[Sample] = []
  for local in batches:
    if len(samples) >= max_examples:
      break
    keys = {"prompt": shardings["inputs"]}
    if "image" in local:
      keys["image"] = shardings["image"]
    g = global_batch({k: local[k] for k in keys}, keys)
    image = image_to_float(g["image"]) if "image" in g else None
    g["prompt_mask"] = g["prompt"] != tok.pad_id  # left padding, never attended
    out = _local_rows(generate(model, g["prompt"], max_new_tokens, image=image,
                               stop_token=tok.eos_id, prompt_mask=g["prompt_mask"]),
                      shardings["inputs"])
    for i in range(out.shape[0]):
      truth_ids = local["targets"][i][local["loss_mask"][i] > 0]
      samples.append(Sample(
          prompt=tok.decode([t for t in local["prompt"][i] if t != tok.pad_id]),
          prediction=tok.decode(out[i]), truth=tok.decode(truth_ids),
          is_caption=bool(local["is_caption"][i]),
          image=np.asarray(local["image"][i]) if "image" in local else None))
  samples = samples[:max_examples]
  # [caption correct, caption total, vqa correct, vqa total], summed over processes.
  c = np.zeros(4)
  for s in samples:
    j = 0 if s.is_caption else 2
    c[j] += s.prediction == s.truth
    c[j + 1] += 1
  c = _sum_over_processes(c)
  metrics = {}
  if c[1]:
    metrics["caption_exact_match"] = float(c[0] / c[1])
  if c[3]:
    metrics["vqa_accuracy"] = float(c[2] / c[3])
  captions = [s for s in samples if s.is_caption]
  # Free-form captions: corpus BLEU-4 and CIDEr-D next to exact match. Both are corpus-level
  # (CIDEr's idf is over the evaluated set), so they are computed where all captions are:
  # single-process jobs only. One reference per image: the row's own target.
  if captions and jax.process_count() == 1:
    scores = caption_scores([s.prediction for s in captions], [[s.truth] for s in captions])
    metrics["caption_bleu4"], metrics["caption_cider"] = scores["bleu4"], scores["cider"]
  return metrics, samples


def save_samples_png(samples: list[Sample], path: str, n: int = 8) -> Optional[str]:
  """A grid of held-out images with the model's text under the reference text; None (after
one warning naming the extra) without matplotlib."""
  shown = [s for s in samples if s.image is not None][:n]
  if not shown or jax.process_index() != 0:
    return None
  titles = [f"{s.prompt}\npred: {s.prediction}\ntrue: {s.truth} "
            f"[{'ok' if s.prediction == s.truth else 'WRONG'}]" for s in shown]
  return save_image_grid([s.image for s in shown], titles, path)
