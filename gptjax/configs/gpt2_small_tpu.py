"""GPT-2 small (124M) on a Cloud TPU slice: FSDP over all chips, bf16 compute, float32
parameters and optimizer state, remat per block. See README "Cloud TPU".

GPT-2's byte-level BPE on pre-tokenised data (made once, on each host's disk or a shared
one; resumable), then:

  python -m gptjax.data.tokens "/data/corpus/*.txt" --tokenizer /data/gpt2 --out /data/gpt2_tokens
  gptjax-train --config gpt2_small_tpu --workdir gs://BUCKET/runs/gpt2

``/data/gpt2`` holds GPT-2's ``vocab.json`` + ``merges.txt`` (or any ``tokenizer.json``); the
50,257-row vocabulary maps HF GPT-2 weights 1:1 (``--config.init_from=/data/gpt2`` starts
from them). Each process reads only its share of the memory-mapped windows.
"""
from gptjax.runs import base_config
from gptjax.train.config import model_section, text_kwargs


def get_config():
  c = base_config()
  c.model = model_section("gpt2-small", dtype="bfloat16", param_dtype="float32", remat="full")
  c.data.name = "tokens"
  c.data.builder_kwargs = text_kwargs(windows="random")  # every text_files / tokens option
  c.data.paths = ("/data/gpt2_tokens",)
  c.data.tokenizer = "/data/gpt2_tokens/tokenizer"  # the copy pre-tokenisation saved
  c.data.task = "lm"
  c.data.seq_len = 1024
  c.data.test_split = ""
  c.train.steps = 100_000
  c.train.batch_size = 512  # global; split over processes and the data x fsdp mesh axes
  c.train.log_every = 50
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 2000
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.mesh.data = 1
  c.mesh.fsdp = -1  # all chips: ZeRO-3-style sharding of params and optimizer state
  c.mesh.tensor = 1
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.eval.every = 2000
  c.eval.batch_size = 64
  c.logging.progress = False  # logs, not a tqdm bar, on unattended TPU VMs
  return c
