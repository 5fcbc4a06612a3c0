"""GPT-2 small (124M) on a Cloud TPU slice: FSDP over all chips, bf16 compute, float32
parameters and optimizer state, remat per block. See README "Cloud TPU".

  python train.py --config configs/gpt2_small_tpu.py --workdir gs://BUCKET/runs/gpt2 \
      --config.data.paths='("/data/corpus/*.txt",)'

The vocabulary keeps GPT-2's 50,257 rows (so HF GPT-2 weights map 1:1); the byte-level
tokenizer uses the first 260 of them until a BPE tokenizer is configured.
"""
import ml_collections

from gptjax.runs import base_config
from gptjax.train.config import model_section


def get_config():
  c = base_config()
  c.model = model_section("gpt2-small", dtype="bfloat16", param_dtype="float32", remat=True)
  c.data.name = "text_files"
  c.data.builder_kwargs = ml_collections.ConfigDict()  # text_files takes only data.paths
  c.data.paths = ("data/*.txt",)
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
