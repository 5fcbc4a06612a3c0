"""ModelConfig / VisionConfig validation, presets and derived sizes."""
import dataclasses

import numpy as np
import pytest

import gptjax
from gptjax import ModelConfig, VisionConfig

TINY = dict(vocab_size=260, max_seq_len=64, width=32, depth=2, num_heads=4, num_kv_heads=2,
            mlp_dim=64, linear_chunk_size=16)


def _model(**kw):
  return ModelConfig(**{**TINY, **kw})


# (field name that must appear in the message, kwargs that make the config invalid)
MODEL_BAD = [
    ("width", dict(width=30)),  # not divisible by num_heads=4
    ("num_kv_heads", dict(num_kv_heads=3)),  # 4 % 3 != 0
    ("attention", dict(attention="flash")),
    ("attention_impl", dict(attention_impl="triton")),
    ("mlp_activation", dict(mlp_activation="relu6")),
    ("norm", dict(norm="batchnorm")),
    ("position", dict(position="alibi")),
    ("position", dict(position="rope", width=12, num_heads=4, num_kv_heads=None)),  # head_dim 3
    ("num_unique_layers", dict(num_unique_layers=3)),  # > depth=2
    ("num_unique_layers", dict(num_unique_layers=0)),
    ("dropout", dict(dropout=1.0)),
    ("dropout", dict(dropout=-0.1)),
    ("dtype", dict(dtype="float8")),
    ("param_dtype", dict(param_dtype="int8")),
    ("vocab_size", dict(vocab_size=0)),
    ("max_seq_len", dict(max_seq_len=-1)),
    ("width", dict(width=0)),
    ("depth", dict(depth=0)),
    ("num_heads", dict(num_heads=0)),
    ("num_kv_heads", dict(num_kv_heads=0)),
    ("mlp_dim", dict(mlp_dim=-4)),
    ("linear_chunk_size", dict(linear_chunk_size=0)),
    ("head_dim", dict(head_dim=0)),
]


@pytest.mark.parametrize("field,kw", MODEL_BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MODEL_BAD)])
def test_model_config_rejects(field, kw):
  with pytest.raises(ValueError, match=field):
    _model(**kw)


VISION_BAD = [
    ("kind", dict(kind="resnet")),
    ("image_size", dict(kind="vit", image_size=30, patch_size=4)),
    ("image_size", dict(kind="cnn", image_size=36, cnn_channels=(8, 8, 8))),  # 36 % 8
    ("image_size", dict(kind="cnn", image_size=0)),
    ("patch_size", dict(kind="vit", patch_size=0)),
    ("width", dict(kind="vit", width=30, num_heads=4)),
    ("channels", dict(channels=0)),
    ("cnn_channels", dict(kind="cnn", cnn_channels=())),
    ("cnn_channels", dict(kind="cnn", cnn_channels=(8, 0))),
    ("cnn_pools", dict(kind="cnn", cnn_channels=(8, 8), cnn_pools=3)),
    ("cnn_pools", dict(kind="cnn", cnn_channels=(8, 8), cnn_pools=-1)),
    ("cnn_pools", dict(kind="cnn", image_size=36, cnn_channels=(8, 8, 8, 8), cnn_pools=3)),
]


@pytest.mark.parametrize("field,kw", VISION_BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(VISION_BAD)])
def test_vision_config_rejects(field, kw):
  with pytest.raises(ValueError, match=field):
    VisionConfig(**kw)


def test_replace_revalidates():
  cfg = gptjax.preset("tiny")
  with pytest.raises(ValueError, match="num_unique_layers"):
    dataclasses.replace(cfg, num_unique_layers=cfg.depth + 1)


@pytest.mark.parametrize("name", ["gpt2-small", "mini", "tiny"])
def test_presets_construct(name):
  assert name in gptjax.preset_names()
  cfg = gptjax.preset(name)
  assert isinstance(cfg, ModelConfig)
  assert cfg.width % cfg.num_heads == 0


def test_unknown_preset():
  with pytest.raises(ValueError):
    gptjax.preset("gpt5-huge")


def test_tiny_values():
  cfg = gptjax.preset("tiny")
  for k, v in TINY.items():
    assert getattr(cfg, k) == v, k
  assert cfg.head_dim == 8
  assert cfg.num_kv_heads == 2
  assert cfg.mlp_dim == 64
  assert cfg.num_unique_layers == 2
  assert cfg.num_image_tokens == 0


def test_gpt2_small_values():
  cfg = gptjax.preset("gpt2-small")
  assert (cfg.vocab_size, cfg.max_seq_len, cfg.width, cfg.depth, cfg.num_heads) == (
      50257, 1024, 768, 12, 12)
  assert cfg.mlp_dim == 3072 and cfg.head_dim == 64 and cfg.num_kv_heads == 12
  assert cfg.tie_embeddings and cfg.position == "learned" and cfg.norm == "layernorm"


def test_derived_defaults():
  cfg = ModelConfig(vocab_size=100, max_seq_len=16, width=48, depth=3, num_heads=6)
  assert cfg.num_kv_heads == 6  # None -> num_heads
  assert cfg.mlp_dim == 4 * 48  # None -> 4 * width
  assert cfg.head_dim == 8
  assert cfg.num_unique_layers == 3
  assert dataclasses.replace(cfg, num_unique_layers=1).num_unique_layers == 1


def test_replace_derives_sizes_again():
  cfg = ModelConfig(vocab_size=100, max_seq_len=16, width=48, depth=3, num_heads=6)
  wide = cfg.replace(width=96, num_heads=8, depth=4)
  assert (wide.head_dim, wide.mlp_dim, wide.num_kv_heads, wide.num_unique_layers) == (
      96 // 8, 4 * 96, 8, 4)
  # An explicitly different value is kept.
  tiny = gptjax.preset("tiny")  # num_kv_heads=2 (not num_heads), mlp_dim=64 (not 4 * width)
  assert tiny.replace(width=64).num_kv_heads == 2 and tiny.replace(width=64).mlp_dim == 64
  assert tiny.replace(width=64).head_dim == 16


@pytest.mark.parametrize("vision", [VisionConfig(kind="cnn", image_size=32),
                                    VisionConfig(kind="vit", image_size=32, patch_size=4)])
def test_documented_tiny_vlm_example(vision):
  """The README's example: a vision encoder added to the tiny preset. Its 64 image tokens
  used to fill max_seq_len=64; max_seq_len bounds the text, and the position table and the
  decode cache are sized for image + text."""
  cfg = dataclasses.replace(gptjax.preset("tiny"), vision=vision)
  assert cfg.num_image_tokens == 64 and cfg.max_total_len == 64 + 64
  model = gptjax.from_config(cfg)
  assert isinstance(model, gptjax.VLM)
  assert model.decoder.positions.table.shape == (128, cfg.width)
  image = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  logits = model(np.ones((2, 64), np.int32), image)  # the whole text budget
  assert logits.shape == (2, 64, cfg.vocab_size)
  out = gptjax.generate(model, np.ones((2, 4), np.int32), 60, image=image)
  assert out.shape == (2, 60)
  with pytest.raises(ValueError, match="max_seq_len=64"):
    gptjax.generate(model, np.ones((2, 4), np.int32), 61, image=image)


def test_byte_vocab_constant_matches_tokenizer():
  from gptjax.config import BYTE_VOCAB_SIZE
  from gptjax.data.tokenizers import ByteTokenizer
  assert BYTE_VOCAB_SIZE == ByteTokenizer.vocab_size == ModelConfig().vocab_size


@pytest.mark.parametrize("kw,tokens", [
    (dict(kind="vit", image_size=32, patch_size=8), 16),
    (dict(kind="vit", image_size=32, patch_size=4), 64),
    (dict(kind="cnn", image_size=32), 64),  # default (32, 64): 2 stages -> 8x8
    (dict(kind="cnn", image_size=32, cnn_channels=(8, 16, 16)), 16),  # 3 stages -> 4x4
    (dict(kind="cnn", image_size=16, cnn_channels=(8,)), 64),
    (dict(kind="cnn", image_size=32, cnn_channels=(8, 8, 8), cnn_pools=2), 64),  # 8x8
    (dict(kind="cnn", image_size=32, cnn_channels=(8, 8), cnn_pools=0), 1024),
    (dict(kind="cnn", image_size=32, global_token=True), 65),
    (dict(kind="vit", image_size=32, patch_size=8, global_token=True), 17),
])
def test_num_tokens(kw, tokens):
  v = VisionConfig(**kw)
  assert v.num_tokens == tokens
  cfg = _model(max_seq_len=tokens + 8, vision=v)
  assert cfg.num_image_tokens == tokens


def test_frozen():
  cfg = gptjax.preset("tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.width = 64
  v = VisionConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    v.kind = "vit"


def test_hashable_and_equal():
  # Frozen configs are used as static jit arguments: they must hash and compare by value.
  assert hash(gptjax.preset("tiny")) == hash(gptjax.preset("tiny"))
  assert gptjax.preset("tiny") == _model()


def test_saved_run_config_of_the_old_layout_is_migrated(tmp_path):
  """Workdirs saved before config version 2 counted image tokens in model.max_seq_len and
  called head_dim head_size: loading them gives today's layout with the same model."""
  import json

  from gptjax.runs import base_config
  from gptjax.train.config import model_config, vision_section
  from gptjax.train.load import load_run_config

  c = base_config()
  c.model.vision = vision_section(kind="cnn", image_size=16, cnn_channels=(8, 16))  # 16 tokens
  c.model.max_seq_len = 48
  today = model_config(c)
  old = json.loads(c.to_json_best_effort())
  del old["version"]
  old["model"]["max_seq_len"] = 48 + 16
  old["model"]["head_size"] = old["model"].pop("head_dim")
  (tmp_path / "config.json").write_text(json.dumps(old))
  loaded = load_run_config(str(tmp_path))
  assert loaded.version == 2
  assert model_config(loaded) == today
  assert model_config(loaded).max_total_len == 64


def test_saved_draw_section_gains_keys_added_since(tmp_path):
  """A draw run saved before ``draw.best_of`` existed loads with its default (1: single
  samples, what that run drew), its own values kept."""
  import json

  from gptjax.runs import base_config
  from gptjax.train.load import load_run_config
  c = base_config()
  old = json.loads(c.to_json_best_effort())
  del old["draw"]["best_of"]
  old["draw"]["cfg_scale"] = 2.5
  (tmp_path / "config.json").write_text(json.dumps(old))
  loaded = load_run_config(str(tmp_path))
  assert loaded.draw.best_of == 1 and loaded.draw.cfg_scale == 2.5
