"""GPT-2 import / export against Hugging Face ``transformers`` itself (test-only extra):
a randomly initialised GPT2LMHeadModel built from a small config in the test (no download)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import gptjax  # noqa: E402
from gptjax.interop import hf_gpt2  # noqa: E402

V, P = 96, 48


def _hf_model(tmp_path, *, tie=True, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=32, n_layer=2, n_head=4,
                                tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # HF inits biases and LayerNorms to 0 / 1: randomise every tensor
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  path = str(tmp_path / f"hf_{'tied' if tie else 'untied'}")
  model.save_pretrained(path)
  return model, path


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, V, size=(3, 40))


@pytest.mark.parametrize("tie", [True, False])
def test_imported_logits_match_transformers(tmp_path, tie):
  hf, path = _hf_model(tmp_path, tie=tie)
  ours = hf_gpt2.load(path)
  assert isinstance(ours, gptjax.GPT) and ours.config.tie_embeddings == tie
  got = np.asarray(ours(TOKENS))
  want = _hf_logits(hf, TOKENS)
  err = np.max(np.abs(got - want))
  assert err < 1e-4, err


def test_pytorch_bin_checkpoints_load_too(tmp_path):
  """The older format (transformers 5 writes safetensors only): a torch state dict."""
  import shutil
  hf, src = _hf_model(tmp_path)
  path = str(tmp_path / "bin")
  os.makedirs(path)
  shutil.copy(os.path.join(src, "config.json"), path)
  torch.save(hf.state_dict(), os.path.join(path, "pytorch_model.bin"))
  np.testing.assert_allclose(np.asarray(hf_gpt2.load(path)(TOKENS)), _hf_logits(hf, TOKENS),
                             atol=1e-4)


def test_greedy_generation_matches_transformers(tmp_path):
  hf, path = _hf_model(tmp_path)
  ours = hf_gpt2.load(path)
  prompt = TOKENS[:2, :8]
  with torch.no_grad():
    # An explicit all-ones mask: HF would otherwise mask prompt tokens equal to pad_token_id.
    want = hf.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape),
                       max_new_tokens=20, do_sample=False, pad_token_id=0,
                       eos_token_id=None).numpy()[:, 8:]
  got = np.asarray(gptjax.generate(ours, prompt, 20))
  np.testing.assert_array_equal(got, want)


def test_round_trip_is_exact_and_exports_load_in_transformers(tmp_path):
  hf, path = _hf_model(tmp_path)
  ours = hf_gpt2.load(path)
  out = str(tmp_path / "exported")
  hf_gpt2.save(ours, out)
  again = hf_gpt2.load(out)
  a = jax_leaves(ours)
  b = jax_leaves(again)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(hf, TOKENS), atol=1e-6)


def test_gptjax_directory_cli_round_trip(tmp_path):
  hf, path = _hf_model(tmp_path)
  hf_gpt2.main(["import", path, "--out", str(tmp_path / "gj")])
  hf_gpt2.main(["export", str(tmp_path / "gj"), "--out", str(tmp_path / "hf2")])
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf2")).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(hf, TOKENS), atol=1e-6)


def jax_leaves(model):
  from flax import nnx

  from gptjax.tree import flat_dict
  return {k: np.asarray(v) for k, v in flat_dict(nnx.state(model, nnx.Param)).items()}


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
  from safetensors.numpy import load_file, save_file
  _, path = _hf_model(tmp_path)
  st = os.path.join(path, "model.safetensors")
  tensors = load_file(st)
  removed = dict(tensors)
  del removed["transformer.h.1.mlp.c_fc.bias"]
  save_file(removed, st, metadata={"format": "pt"})
  with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
    hf_gpt2.load(path)
  reshaped = dict(tensors)
  reshaped["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:10]
  save_file(reshaped, st, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"transformer\.wpe\.weight|wpe\.weight.*\(10, 32\)"):
    hf_gpt2.load(path)
  save_file(tensors, st, metadata={"format": "pt"})
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["model_type"] = "llama"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ValueError, match="model_type='llama'"):
    hf_gpt2.load(path)


def test_export_refuses_what_gpt2_cannot_express(tmp_path):
  from flax import nnx
  # GQA (num_kv_heads=2 < num_heads=4); abstract: the config check comes before any tensor.
  model = nnx.eval_shape(lambda: gptjax.GPT(gptjax.preset("tiny"), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="num_kv_heads=2"):
    hf_gpt2.save(model, str(tmp_path / "x"))
