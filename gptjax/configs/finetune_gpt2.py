"""Fine-tune pretrained GPT-2 (a local Hugging Face directory) on your own text files.

  gptjax-train --config finetune_gpt2 --workdir runs/ft \\
      --config.init_from=/path/to/gpt2 --config.data.tokenizer=/path/to/gpt2 \\
      --config.data.paths='("~/books/*.txt",)'

``/path/to/gpt2`` is what ``GPT2LMHeadModel.save_pretrained`` writes (``config.json``,
``model.safetensors``, ``vocab.json`` + ``merges.txt``). The model section is the
``gpt2-small`` preset (124M); for a larger GPT-2 set ``--config.model.width`` / ``depth`` /
``num_heads`` / ``mlp_dim`` to its sizes (a mismatch is an error listing every field).
"""
from gptjax.runs import base_config
from gptjax.train.config import model_section, text_kwargs


def get_config():
  c = base_config()
  c.init_from = "gpt2"  # a local directory; set it on the command line
  c.model = model_section("gpt2-small", max_seq_len=1024)
  c.data.name = "text_files"
  c.data.tokenizer = "gpt2"  # GPT-2's BPE from the same directory
  c.data.builder_kwargs = text_kwargs(split_mode="tail", validation_fraction=0.05)
  c.data.paths = ("data/*.txt",)
  c.data.task = "lm"
  c.data.seq_len = 256
  c.data.test_split = ""
  c.train.steps = 500
  c.train.batch_size = 8
  c.optim.lr = 1e-4  # fine-tuning: well below the pretraining lr
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.01
  c.checkpoint.every = 250
  c.eval.every = 250
  return c
