"""The draw task: a caption -> the G x G image codes of an ``image_codes`` tokenizer, generated
by the same decoder that reads text, token by token in raster order.

Id layout (``DrawTokens``): the text tokenizer's ids come first, unchanged; image code ``c``
is id ``text_vocab_size + c``; one ``<img>`` id follows the codes and marks where an image
starts. A draw row reads ``<bos> caption <img>`` and is trained on the codes that follow
(``gptjax.data.pipeline.encode_draw``). The unconditional prompt, for classifier-free
guidance, is ``<bos> <img>`` (an empty caption), which is what caption dropout trains.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from gptjax.generate import generate


@dataclasses.dataclass(frozen=True)
class DrawTokens:
  """Where image codes and ``<img>`` sit in the joint vocabulary (see the module docstring)."""
  text_vocab_size: int
  codebook_size: int

  def __post_init__(self):
    for name in ("text_vocab_size", "codebook_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"DrawTokens.{name}={getattr(self, name)} is invalid: must be >= 1")

  @property
  def code_offset(self) -> int:
    return self.text_vocab_size

  @property
  def img_id(self) -> int:
    return self.text_vocab_size + self.codebook_size

  @property
  def vocab_size(self) -> int:
    """Text + codes + ``<img>``: the smallest ``ModelConfig.vocab_size`` that holds them."""
    return self.img_id + 1

  def code_mask(self, vocab_size_total: int) -> np.ndarray:
    """(V,) bool, True exactly on the image-code ids (not on ``<img>``, text or padding ids
    past ``vocab_size``, e.g. a vocabulary rounded up for speed)."""
    if vocab_size_total < self.vocab_size:
      raise ValueError(f"vocab_size_total={vocab_size_total} is invalid: must be >= "
                       f"{self.vocab_size} (text {self.text_vocab_size} + codes "
                       f"{self.codebook_size} + <img>)")
    mask = np.zeros(vocab_size_total, bool)
    mask[self.code_offset:self.code_offset + self.codebook_size] = True
    return mask

  def code_ids(self, codes) -> np.ndarray:
    """Codes in [0, codebook_size) -> token ids."""
    c = np.asarray(codes)
    if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
      raise ValueError(f"codes must be in [0, codebook_size={self.codebook_size}), got "
                       f"[{c.min()}, {c.max()}]")
    return (c + self.code_offset).astype(np.int32)

  def codes(self, ids) -> np.ndarray:
    """Token ids of image codes -> codes; any other id is an error."""
    i = np.asarray(ids)
    if i.size and (i.min() < self.code_offset or i.max() >= self.img_id):
      raise ValueError(f"ids must be image-code ids in [{self.code_offset}, {self.img_id}), "
                       f"got [{i.min()}, {i.max()}]")
    return (i - self.code_offset).astype(np.int32)


def draw_tokens(text_vocab_size: int, codebook_size: int) -> DrawTokens:
  return DrawTokens(int(text_vocab_size), int(codebook_size))


def draw_prompt(tok, caption: str, layout: DrawTokens) -> list[int]:
  """``<bos> caption <img>`` (``caption=''`` gives the unconditional prompt ``<bos> <img>``)."""
  return tok.encode(caption, bos=True) + [layout.img_id]


def sample_codes(model, prompt_ids: Sequence[Sequence[int]], layout: DrawTokens, num_codes: int,
                 *, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
                 uncond_ids: Optional[Sequence[int]] = None, image=None, seed: int = 0
                 ) -> np.ndarray:
  """Draw: exactly ``num_codes`` (G*G) image codes per prompt -> int32 (B, num_codes).

  ``prompt_ids``: B prompts as ``draw_prompt`` makes them (ending in ``<img>``). Every step
  samples only among image-code ids (``logits_mask``), so the result always decodes.
  ``cfg_scale``: classifier-free guidance against ``uncond_ids`` (``draw_prompt(tok, '',
  layout)``): the B prompts and B copies of it run as one 2B batch. ``image``: for a VLM
  trained on draw rows with a (blank) image, the (B, H, W, C) images those rows carried.
  """
  prompts = [list(map(int, p)) for p in prompt_ids]
  if not prompts:
    raise ValueError("prompt_ids must hold at least one prompt")
  if num_codes < 1:
    raise ValueError(f"num_codes={num_codes} is invalid: must be >= 1 (grid * grid)")
  if cfg_scale is not None:
    if uncond_ids is None:
      raise ValueError("cfg_scale needs uncond_ids, the unconditional prompt: "
                       "draw_prompt(tok, '', layout)")
    prompts = prompts + [list(map(int, uncond_ids))] * len(prompts)
    if image is not None:
      image = np.concatenate([np.asarray(image)] * 2)
  mask = layout.code_mask(model.config.vocab_size)
  ids = generate(model, prompts, num_codes, image=image, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, logits_mask=mask, cfg_scale=cfg_scale)
  return layout.codes(np.asarray(ids))
