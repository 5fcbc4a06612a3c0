"""grain input pipelines: records -> tokenized, masked, fixed-shape batches -> global arrays.

Two tasks:
- ``vqa``: image + prompt -> target (captioning and visual question answering). Each row is
  ``[pad.. <bos> prompt <sep>] [target <eos> pad..]``: the prompt is left-padded to
  ``prompt_len`` and the target right-padded to ``target_len``, so every answer starts at the
  same position and a batch decodes in one call. Padding carries segment id -1 (never
  attended) and real tokens take positions 0, 1, ... after it, so a padded row computes
  exactly what the unpadded sequence would. The loss is on the target tokens and ``<eos>``.
  With ``pack=True`` (softmax attention) all tasks of one image share a row instead:
  ``[<bos> p1 <sep> t1 <eos>][<bos> p2 <sep> t2 <eos>]...`` with segment ids 1, 2, ... —
  each segment sees only itself and the image — so the image is encoded once per record
  rather than once per task and little compute goes to padding.
- ``lm``: documents joined with ``<eos>`` and cut into ``seq_len + 1`` windows (GPT-2 style
  packing, no cross-document masking), loss on every token.

Determinism and resumption: the pipeline is a ``grain.MapDataset`` (random access, shuffled
with a seed, reshuffled each epoch) sliced per process (``process_index::process_count``)
and turned into an iterator whose state is a position, saved with the checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import numpy as np

from gptjax.data.tokenizers import ByteTokenizer
from gptjax.data.tokens import TokenFile
from gptjax.layers.attention import PAD_SEGMENT

CAPTION_PROMPT = "caption:"


@dataclasses.dataclass(frozen=True)
class Example:
  """One (image, prompt, target) task before tokenization."""
  image: Optional[np.ndarray]
  prompt: str
  target: str
  kind: str  # 'caption' | 'vqa'


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def tasks_per_record(record: dict, *, caption_key: str = "caption",
                     questions_key: str = "questions", answers_key: str = "answers",
                     image_key: str = "image", label_names: Optional[Sequence[str]] = None
                     ) -> list[Example]:
  """All tasks a record yields: its caption (or class name) and each QA pair."""
  image = np.asarray(record[image_key]) if image_key in record else None
  out = []
  if caption_key in record:
    cap = record[caption_key]
    if label_names is not None and not isinstance(cap, (bytes, str)):
      cap = label_names[int(cap)]  # ClassLabel datasets (mnist...): caption = class name
    out.append(Example(image, CAPTION_PROMPT, _text(cap), "caption"))
  for q, a in zip(record.get(questions_key, ()), record.get(answers_key, ())):
    out.append(Example(image, _text(q), _text(a), "vqa"))
  if not out:
    raise ValueError(f"record has neither {caption_key!r} nor {questions_key!r}/{answers_key!r}; "
                     f"keys are {sorted(record)}: set data.caption_key / data.questions_key")
  return out


class TaskSource:
  """Random-access view of a record source as a flat list of tasks (``tasks`` per record).

  A stable ``__repr__`` because grain compares sources on checkpoint restore.
  """

  def __init__(self, source, tasks: int, make: Callable[[dict], list[Example]], name: str):
    self.source, self.tasks, self.make, self.name = source, tasks, make, name

  def __len__(self) -> int:
    return len(self.source) * self.tasks

  def __getitem__(self, i: int) -> Example:
    r, t = divmod(int(i), self.tasks)
    return self.make(self.source[r])[t]

  def __repr__(self) -> str:
    return f"TaskSource({self.name}, records={len(self.source)}, tasks={self.tasks})"




def _task_tokens(ex: Example, tok: ByteTokenizer, prompt_len: int, target_len: int):
  prompt = tok.encode(ex.prompt, bos=True) + [tok.sep_id]
  target = tok.encode(ex.target) + [tok.eos_id]
  if len(prompt) > prompt_len:
    raise ValueError(f"prompt {ex.prompt!r} needs {len(prompt)} tokens > data.prompt_len={prompt_len}")
  if len(target) > target_len:
    raise ValueError(f"target {ex.target!r} needs {len(target)} tokens > data.target_len={target_len}")
  return prompt, target


def _shifted(seq, mask, seg, pos) -> dict:
  """Next-token form: inputs[j] predicts targets[j] = seq[j + 1]."""
  return {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": mask[1:],
          "segment_ids": seg[:-1], "positions": pos[:-1]}


def _prompt_target_row(prompt: list[int], target: list[int], pad_id: int, prompt_len: int,
                       target_len: int) -> dict:
  """The one-task row layout (vqa and draw rows): ``[pad.. prompt][target pad..]``, the
  prompt left-padded to ``prompt_len`` so every row's target starts at the same column,
  loss on the target only, positions counting real tokens; plus the left-padded
  ``prompt`` for decoding."""
  lpad = prompt_len - len(prompt)
  n = len(prompt) + len(target)
  total = prompt_len + target_len
  seq = np.full(total, pad_id, np.int32)
  seq[lpad:lpad + n] = prompt + target
  real = np.zeros(total, bool)
  real[lpad:lpad + n] = True
  mask = np.zeros(total, np.float32)
  mask[prompt_len:prompt_len + len(target)] = 1.0  # positions of target tokens in `seq`
  seg = np.where(real, 1, PAD_SEGMENT).astype(np.int32)
  pos = np.clip(np.cumsum(real) - 1, 0, None).astype(np.int32)
  out = _shifted(seq, mask, seg, pos)
  out["prompt"] = seq[:prompt_len]
  return out


def encode_vqa(ex: Example, tok: ByteTokenizer, prompt_len: int, target_len: int) -> dict:
  """One task per row -> inputs/targets/loss_mask/segment_ids/positions (text_len =
  prompt_len + target_len - 1), image, and the left-padded ``prompt`` for decoding."""
  prompt, target = _task_tokens(ex, tok, prompt_len, target_len)
  out = _prompt_target_row(prompt, target, tok.pad_id, prompt_len, target_len)
  out["is_caption"] = np.int32(ex.kind == "caption")
  if ex.image is not None:
    out["image"] = ex.image.astype(np.uint8)
  return out


def encode_packed(tasks: Sequence[Example], tok: ByteTokenizer, prompt_len: int,
                  target_len: int, packed_len: int) -> dict:
  """All tasks of one record in one row of ``packed_len`` text tokens (+1 for the shift).

  Tasks that no longer fit are dropped (in order: the caption first, then the questions).
  """
  total = packed_len + 1
  seq = np.full(total, tok.pad_id, np.int32)
  mask = np.zeros(total, np.float32)
  seg = np.full(total, PAD_SEGMENT, np.int32)
  pos = np.zeros(total, np.int32)
  at = 0
  for i, ex in enumerate(tasks):
    prompt, target = _task_tokens(ex, tok, prompt_len, target_len)
    n = len(prompt) + len(target)
    if at + n > total:
      break
    seq[at:at + n] = prompt + target
    mask[at + len(prompt):at + n] = 1.0
    seg[at:at + n] = i + 1
    pos[at:at + n] = np.arange(n)
    at += n
  if at == 0:
    raise ValueError(f"data.packed_len={packed_len} cannot hold even the first task of a record")
  out = _shifted(seq, mask, seg, pos)
  if tasks[0].image is not None:
    out["image"] = tasks[0].image.astype(np.uint8)
  return out


def encode_caption(text: str, tok: ByteTokenizer, length: int) -> tuple[np.ndarray, np.int32]:
  """The contrastive text tower's input: ``text <eos>`` (the caption task's target tokens)
  right-padded with the pad id to ``length`` (data.target_len), and its real length."""
  ids = tok.encode(text) + [tok.eos_id]
  if len(ids) > length:
    raise ValueError(f"caption {text!r} needs {len(ids)} tokens > data.target_len={length}")
  out = np.full(length, tok.pad_id, np.int32)
  out[:len(ids)] = ids
  return out, np.int32(len(ids))


def _with_caption(out: dict, tasks: Sequence[Example], tok: ByteTokenizer, length: int,
                  on: bool) -> dict:
  """``out`` + ``caption_ids`` / ``caption_len`` (``on``) of the first caption task among
  ``tasks``; length 0 when there is none (an unpacked question row)."""
  if not on:
    return out
  cap = next((ex for ex in tasks if ex.kind == "caption"), None)
  ids, n = ((np.full(length, tok.pad_id, np.int32), np.int32(0)) if cap is None
            else encode_caption(cap.target, tok, length))
  out.update(caption_ids=ids, caption_len=n)
  return out


@dataclasses.dataclass
class Pipeline:
  """A per-process batch iterator plus what is needed to checkpoint and describe it."""
  dataset: Any  # grain.MapDataset of per-process batches
  iterator: Any  # grain DatasetIterator (checkpointable)
  num_examples: int  # tasks (vqa) or windows (lm) in one epoch, all processes

  def __iter__(self):
    return self.iterator

  def __next__(self):
    return next(self.iterator)


def _lm_windows(source, tok: ByteTokenizer, seq_len: int, text_key: str) -> np.ndarray:
  """All documents joined by <eos> (between documents only: a document's own text is
  never interrupted or followed by a token it did not contain), cut into (n, seq_len + 1)
  windows (the tail dropped)."""
  ids: list[int] = []
  for i in range(len(source)):
    if i:
      ids.append(tok.eos_id)
    ids += tok.encode(_text(source[i][text_key]))
  n = len(ids) // (seq_len + 1)
  if n == 0:
    raise ValueError(f"the corpus has {len(ids)} tokens, fewer than data.seq_len + 1 = "
                     f"{seq_len + 1}: lower data.seq_len or add text")
  return np.asarray(ids[: n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


def make_pipeline(source, *, task: str, batch_size: int, seed: int = 0, shuffle: bool = True,
                  repeat: bool = True, prompt_len: int = 32, target_len: int = 64,
                  seq_len: int = 128, text_key: str = "text", name: str = "data",
                  record_to_tasks: Optional[Callable[[dict], list[Example]]] = None,
                  tasks_per: Optional[int] = None, drop_remainder: bool = True,
                  pack: bool = False, packed_len: int = 224,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  tokenizer: Optional[ByteTokenizer] = None, captions: bool = False) -> Pipeline:
  """Batches of this process's share of ``batch_size`` (the global batch).

  ``batch_size`` must divide by the process count; each process reads every
  ``process_count``-th element of the shuffled order, so together they see each element once.
  ``captions`` (vqa): each row also carries its image's caption as ``caption_ids`` /
  ``caption_len`` (``encode_caption``), for the contrastive loss.
  """
  tok = tokenizer or ByteTokenizer()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if batch_size % pc:
    raise ValueError(f"batch_size={batch_size} must divide by the {pc} processes")
  if task == "vqa" and pack:
    make = record_to_tasks or tasks_per_record
    ds = grain.MapDataset.source(TaskSource(source, 1, lambda r: [make(r)], name))
    ds = ds.map(lambda tasks: _with_caption(
        encode_packed(tasks, tok, prompt_len, target_len, packed_len), tasks, tok, target_len,
        captions))
  elif task == "vqa":
    make = record_to_tasks or tasks_per_record
    n_tasks = tasks_per or len(make(source[0]))
    ds = grain.MapDataset.source(TaskSource(source, n_tasks, make, name))
    ds = ds.map(lambda ex: _with_caption(encode_vqa(ex, tok, prompt_len, target_len), [ex],
                                         tok, target_len, captions))
  elif task == "lm":
    # Pre-tokenised data: windows read lazily from the memory map; text: tokenised here.
    windows = (source.windows(seq_len) if isinstance(source, TokenFile)
               else _lm_windows(source, tok, seq_len, text_key))
    ds = grain.MapDataset.source(windows).map(
        lambda w: {"inputs": w[:-1], "targets": w[1:],
                   "loss_mask": np.ones(seq_len, np.float32)})
  else:
    raise ValueError(f"data.task={task!r} is invalid: allowed values are 'vqa', 'lm'")
  num_examples = len(ds)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # grain reshuffles with a new permutation every epoch
  if repeat:
    ds = ds.repeat(None)
  ds = ds[pi::pc]
  ds = ds.batch(batch_size // pc, drop_remainder=drop_remainder)
  return Pipeline(ds, batch_iterator(ds), num_examples)


# grain's default read-ahead (16 threads, 500 elements) counts elements, and ours are whole
# batches: a run's first next() queued 500 batches, 5-8 s of CPU on a 2-core machine, and the
# first steps ran 1.5-3.7x slower while it filled (measured, benchmarks/input_pipeline.py);
# 16 batches ahead still keep the step fed (the pipeline reads 20-700x faster than the step).
PREFETCH_BATCHES = 16


def batch_iterator(ds: "grain.MapDataset"):
  """The checkpointable iterator of a batched ``MapDataset``, reading a few batches ahead on
  up to 16 threads (one per core). Its state is the same whatever the read options, so
  checkpoints of earlier runs restore."""
  threads = max(1, min(16, os.cpu_count() or 1))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=PREFETCH_BATCHES)))


# --- draw rows: caption -> image codes (gptjax.tasks.drawing has the id layout) ----------------

def encode_draw(caption: str, codes, tok: ByteTokenizer, *, img_id: int, code_offset: int,
                prompt_len: int, target_len: int, image_shape: Optional[tuple] = None) -> dict:
  """A draw row in ``encode_vqa``'s layout, so it can share a batch with vqa rows:
  ``[pad.. <bos> caption <img>] [code ids pad..]`` with the loss on the code ids only (their
  count is fixed, G*G, so there is no ``<eos>``). Code ``c`` is id ``code_offset + c``.
  ``image_shape`` (H, W, C): the row carries a black image of that shape, for batches whose
  other rows have images (the codes must come from the caption, not from a picture of the
  answer); ``None``: no image key."""
  codes = np.asarray(codes)
  if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer) or codes.size == 0:
    raise ValueError(f"codes with shape {codes.shape} and dtype {codes.dtype} is invalid: "
                     "expected one record's non-empty 1-D integer codes (G*G,)")
  if codes.min() < 0 or code_offset + codes.max() >= img_id:
    raise ValueError(f"codes in [{codes.min()}, {codes.max()}] are invalid: code_offset + code "
                     f"must lie in [{code_offset}, img_id={img_id})")
  prompt = tok.encode(caption, bos=True) + [img_id]
  target = (codes.astype(np.int64) + code_offset).tolist()
  if len(prompt) > prompt_len:
    raise ValueError(f"caption {caption!r} needs {len(prompt)} tokens > data.prompt_len={prompt_len}")
  if len(target) > target_len:
    raise ValueError(f"{len(target)} image codes > data.target_len={target_len}")
  out = _prompt_target_row(prompt, target, tok.pad_id, prompt_len, target_len)
  out["is_caption"] = np.int32(0)
  if image_shape is not None:
    out["image"] = np.zeros(tuple(image_shape), np.uint8)
  return out


class DrawSource:
  """Random access to (caption, codes) of record ``i``: ``codes`` (N, G*G) int32 were
  computed once for the whole split, row ``i`` from record ``i`` (the tokenizer never runs
  inside the data pipeline). With ``uncond_prob`` p a fixed pseudo-random p of the records
  (a pure function of ``seed`` and the index, so resumption sees the same ones) get an empty
  caption: the unconditional rows classifier-free guidance needs."""

  def __init__(self, source, codes, *, caption_key: str = "caption", uncond_prob: float = 0.0,
               seed: int = 0, name: str = "draw"):
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) != len(source) or not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"codes with shape {codes.shape} and dtype {codes.dtype} is invalid: "
                       f"expected integer (N, G*G) with N = len(source) = {len(source)}")
    if not 0.0 <= uncond_prob < 1.0:
      raise ValueError(f"uncond_prob={uncond_prob} is invalid: must be in [0, 1)")
    self.source, self.codes, self.caption_key = source, codes.astype(np.int32), caption_key
    self.uncond_prob, self.seed, self.name = uncond_prob, seed, name

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
    i = int(i)
    drop = self.uncond_prob > 0 and np.random.default_rng([self.seed, i]).random() < self.uncond_prob
    caption = "" if drop else _text(self.source[i][self.caption_key])
    return caption, self.codes[i]

  def __repr__(self) -> str:
    return (f"DrawSource({self.name}, records={len(self.source)}, codes={self.codes.shape[1]}, "
            f"uncond_prob={self.uncond_prob}, seed={self.seed})")


def draw_dataset(source: DrawSource, tok: ByteTokenizer, *, img_id: int, code_offset: int,
                 prompt_len: int, target_len: int, image_shape: Optional[tuple] = None
                 ) -> "grain.MapDataset":
  """Encoded draw rows (unshuffled, unbatched), e.g. to ``grain.MapDataset.mix`` with vqa
  rows of the same ``prompt_len`` / ``target_len`` before shuffling and batching."""
  return grain.MapDataset.source(source).map(
      lambda r: encode_draw(r[0], r[1], tok, img_id=img_id, code_offset=code_offset,
                            prompt_len=prompt_len, target_len=target_len,
                            image_shape=image_shape))
