"""Jitted sampling: prefill once, then one ``lax.while_loop`` over single-token steps.

Two programs, each compiled at bucketed shapes: the prefill, keyed on the padded prompt
length (a power of two), and the decode loop, keyed on the output buffer (a power of two)
and the cache length (a multiple of 64). A prompt of another length or a different
``max_new_tokens`` within the same buckets compiles nothing new; the loop's trip count is a
traced value.

Softmax attention decodes against a KV cache; linear attention against its O(1) recurrent
state. Greedy, temperature, top-k and top-p (nucleus) sampling; an optional stop token ends
a row (later positions repeat it) and the loop exits early once every row has stopped.

Two optional constraints on every step's logits, applied before temperature / top-k / top-p:
``logits_mask`` (V,) bool keeps only the allowed ids (e.g. image codes while drawing), and
``cfg_scale`` is classifier-free guidance: the batch holds B conditional rows then B
unconditional ones, each step samples one token per pair from ``u + s * (c - u)`` and feeds
that same token to both rows, so the output has B rows.
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.model import VLM, check_tokens


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature, greedy: bool,
                  top_k: Optional[int] = None, top_p: Optional[float] = None) -> jax.Array:
  """logits (B, V) float32 -> token ids (B,) int32."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None:
    # Keep the smallest set of tokens whose probability mass reaches top_p (always >= 1).
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def bucket(n: int, minimum: int = 16) -> int:
  """The shape a length ``n`` is compiled at: the next power of two >= n (and >= minimum).
  Prompts are left-padded (masked) to it and the output buffer sized by it, so a new prompt
  length or token budget within the same bucket reuses both compiled programs."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, tokens, token_mask, image, *, cache_len: int):
  """The prompt (and image) into a fresh cache of ``cache_len`` slots -> (last logits, cache).
  Its own program: it is keyed on the prompt's shape, the decode loop is not."""
  model = nnx.merge(graphdef, state)
  model.eval()  # no dropout while sampling
  cache = model.init_cache(tokens.shape[0], cache_len)
  if image is None:
    return model.decode(tokens, cache, token_mask=token_mask)
  return model.decode(tokens, cache, image=image, token_mask=token_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len", "greedy", "top_k", "top_p",
                                             "stop_token", "guided"))
def _decode(graphdef, state, logits, cache, key, temperature, num_new, logits_mask=None,
            cfg_scale=None, *, out_len: int, greedy: bool, top_k, top_p, stop_token,
            guided: bool = False):
  """Sample ``num_new`` (traced, <= ``out_len``) tokens after the prefill's ``logits``:
  one ``lax.while_loop`` of single-token steps against ``cache`` -> (B, out_len) int32."""
  model = nnx.merge(graphdef, state)
  model.eval()
  b = logits.shape[0] // 2 if guided else logits.shape[0]  # rows of the output
  fill = 0 if stop_token is None else stop_token

  def sample(logits, key):
    if guided:  # (2B, V) -> (B, V): conditional rows first, unconditional after
      cond, uncond = logits[:b].astype(jnp.float32), logits[b:].astype(jnp.float32)
      logits = uncond + cfg_scale * (cond - uncond)
    if logits_mask is not None:
      logits = jnp.where(logits_mask, logits.astype(jnp.float32), -jnp.inf)
    return sample_logits(logits, key, temperature=temperature, greedy=greedy, top_k=top_k,
                         top_p=top_p)

  def feed(tok):  # the token both rows of a guided pair read next
    return jnp.concatenate([tok, tok]) if guided else tok

  key, sub = jax.random.split(key)
  tok = sample(logits, sub)
  out = jnp.full((b, out_len), fill, jnp.int32).at[:, 0].set(tok)
  done = (tok == stop_token) if stop_token is not None else jnp.zeros((b,), bool)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < num_new) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, key, out, done = carry
    logits, cache = model.decode(feed(tok)[:, None], cache)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, fill, sample(logits, sub))
    out = out.at[:, i].set(nxt)
    if stop_token is not None:
      done = done | (nxt == stop_token)
    return i + 1, nxt, cache, key, out, done

  carry = (jnp.asarray(1, jnp.int32), tok, cache, key, out, done)
  return jax.lax.while_loop(cond, body, carry)[4]


def _left_pad(tokens: jax.Array, mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  extra = length - tokens.shape[1]
  if extra == 0:
    return tokens, mask
  return (jnp.pad(tokens, ((0, 0), (extra, 0))),
          jnp.pad(mask, ((0, 0), (extra, 0)), constant_values=False))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Ragged prompts -> left-padded (B, T) int32 tokens and their (B, T) bool mask."""
  if not len(prompts) or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token sequences")
  t = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = p
    mask[i, t - len(p):] = True
  return tokens, mask


def generate(model: nnx.Module, tokens, max_new_tokens: int, *, image=None,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0,
             stop_token: Optional[int] = None, prompt_mask=None, logits_mask=None,
             cfg_scale: Optional[float] = None) -> jax.Array:
  """Sample ``max_new_tokens`` continuations of ``tokens`` -> (B, max_new_tokens) int32.

  ``tokens``: a (B, T) array, or a list of token lists of different lengths (left-padded
  here). ``prompt_mask`` (B, T) bool marks the real tokens of a left-padded array batch;
  padding is never attended and does not shift positions, so each row decodes exactly as
  it would alone. ``image`` (B, H, W, C) conditions a ``VLM``. ``temperature=0`` is
  greedy; ``top_k`` / ``top_p`` restrict sampling.

  ``logits_mask`` (V,) bool: only ids where it is True can be sampled (the others get -inf
  logits before temperature / top-k / top-p). ``cfg_scale`` s: classifier-free guidance;
  ``tokens`` (and ``image``) then hold 2B rows, the B conditional prompts first and their B
  unconditional counterparts after; the result has B rows, sampled from
  ``uncond + s * (cond - uncond)`` (s = 1 is the conditional model, s = 0 the unconditional).
  """
  cfg = model.config
  if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]) and \
      len({len(p) for p in tokens}) > 1:
    if prompt_mask is not None:
      raise ValueError("prompt_mask is only for (B, T) arrays; ragged lists are padded here")
    tokens, prompt_mask = pad_prompts(tokens)
  tokens = jnp.asarray(tokens, jnp.int32)
  if prompt_mask is not None:
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if prompt_mask.shape != tokens.shape:
      raise ValueError(f"prompt_mask shape {prompt_mask.shape} must equal tokens shape "
                       f"{tokens.shape}")
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise ValueError(f"tokens shape {tokens.shape} is invalid: expected (B, T) with T >= 1")
  check_tokens(tokens, cfg.vocab_size)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if cfg_scale is not None and tokens.shape[0] % 2:
    raise ValueError(f"cfg_scale needs 2B prompt rows (B conditional, then B unconditional), "
                     f"got {tokens.shape[0]} rows")
  if logits_mask is not None:
    logits_mask = jnp.asarray(logits_mask)
    if logits_mask.shape != (cfg.vocab_size,) or logits_mask.dtype != bool:
      raise ValueError(f"logits_mask with shape {logits_mask.shape} and dtype "
                       f"{logits_mask.dtype} is invalid: expected bool ({cfg.vocab_size},) "
                       "(ModelConfig.vocab_size)")
    allowed = int(logits_mask.sum())
    if allowed == 0:
      raise ValueError("logits_mask allows no token: at least one entry must be True")
    if top_k is not None and top_k > allowed:
      raise ValueError(f"top_k={top_k} must be <= the {allowed} ids logits_mask allows")
  if image is not None:
    if not isinstance(model, VLM):
      raise ValueError(f"image was given but the model is a {type(model).__name__}; "
                       "only a VLM takes images")
    image = jnp.asarray(image)
  p = cfg.num_image_tokens if image is not None else 0
  t = tokens.shape[1]
  if cfg.position == "learned" and p + t + max_new_tokens > cfg.max_total_len:
    raise ValueError(f"image tokens ({p}) + prompt ({t}) + max_new_tokens "
                     f"({max_new_tokens}) = {p + t + max_new_tokens} exceeds the "
                     f"{cfg.max_total_len} learned positions (image tokens "
                     f"{cfg.num_image_tokens} + ModelConfig.max_seq_len={cfg.max_seq_len})")
  # Compiled shapes are buckets (see ``bucket``), never past a learned table's length: the
  # padding occupies cache slots, not positions, so the checked sum above is what counts.
  room = cfg.max_total_len - p if cfg.position == "learned" else None
  t_pad = bucket(t) if room is None else max(t, min(bucket(t), room - max_new_tokens))
  out_len = bucket(max_new_tokens)
  if room is not None:
    out_len = max(max_new_tokens, min(out_len, room - t_pad))
  # The cache length is a power of two too (>= 64 slots), so every prompt whose bucket plus
  # the output still fits the same cache (prompts 1-128 with 128 new tokens: 256 slots)
  # recompiles only the prefill, never the decode loop. Every decode step reads every slot
  # (masked), but measured at GPT-2-small shape, batch 8, on CPU a 256-slot cache decodes
  # as fast as a 192-slot one (30.9 vs 30.4 ms a step, within noise): the weights dominate.
  cache_len = bucket(p + t_pad + out_len, minimum=64)
  if room is not None:
    cache_len = min(cache_len, cfg.max_total_len)
  mask = jnp.ones(tokens.shape, bool) if prompt_mask is None else prompt_mask
  tokens, mask = _left_pad(tokens, mask, t_pad)
  graphdef, state = nnx.split(model)
  guided = cfg_scale is not None
  logits, cache = _prefill(graphdef, state, tokens, mask, image, cache_len=cache_len)
  out = _decode(graphdef, state, logits, cache, jax.random.key(seed),
                jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
                jnp.asarray(max_new_tokens, jnp.int32), logits_mask,
                jnp.asarray(cfg_scale, jnp.float32) if guided else None,
                out_len=out_len, greedy=temperature == 0.0, top_k=top_k, top_p=top_p,
                stop_token=stop_token, guided=guided)
  return out if out_len == max_new_tokens else out[:, :max_new_tokens]


class _CallableModule(types.ModuleType):
  """``gptjax.generate`` is this module *and* the sampling function: ``from gptjax import
  generate; generate(model, tokens, n)`` and ``gptjax.generate.generate(model, tokens, n)``
  both work (a package attribute cannot be a submodule and a function at once)."""

  def __call__(self, *args, **kwargs) -> jax.Array:
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
