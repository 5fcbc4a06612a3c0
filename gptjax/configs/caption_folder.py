"""A captioner on your own images: a small CNN VLM trained to caption (and to answer the
questions, if the captions file has QA pairs) the images of one folder.

  gptjax-train --config caption_folder --workdir runs/captions \
      --config.data.paths='("my_images",)'

The folder holds the images and ``captions.jsonl`` (``{"file": "a.jpg", "captions": [..],
"qa": [{"question": .., "answer": ..}], "split": ..}`` per line) or ``captions.csv``
(``file,caption[,split]``); see ``gptjax.data.builders.image_text``. Images are stored at
``model.vision.image_size`` (64 px here; change that one key to change both). Byte-level
text, so any language and punctuation works; captions and answers up to 95 bytes, questions
up to 62 (raise data.target_len / data.prompt_len and model.max_seq_len together for more).
"""
import ml_collections

from gptjax.data.tokenizers import make_tokenizer
from gptjax.runs import base_config
from gptjax.train.config import model_section, vision_section


def image_text_kwargs(**kw) -> ml_collections.ConfigDict:
  """Builder arguments of ``image_text``, all present so each is overridable.
  ``image_size`` None: the model's ``vision.image_size`` (``gptjax.train.data.load_split``)."""
  d = dict(image_size=ml_collections.config_dict.placeholder(int), train_fraction=0.8,
           validation_fraction=0.1, test_fraction=0.1, skip_bad=False)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def get_config():
  c = base_config()
  c.data.name = "image_text"
  c.data.paths = ()  # required: --config.data.paths='("my_images",)'
  c.data.builder_kwargs = image_text_kwargs()
  c.data.task = "vqa"
  c.data.tokenizer = "byte"
  c.data.prompt_len = 64  # <bos> question <sep>
  c.data.target_len = 96  # caption / answer <eos>
  c.model = model_section(
      # 159 text tokens + 65 image tokens (8x8 grid + global).
      "mini", max_seq_len=160, dropout=0.1,
      vocab_size=make_tokenizer(c.data.tokenizer).vocab_size,
      vision=vision_section(kind="cnn", image_size=64, cnn_channels=(32, 64, 64), width=128,
                            global_token=True, cnn_pos_embed=True))
  c.train.steps = 3000
  c.train.batch_size = 32
  c.train.log_every = 50
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every = 500
  c.eval.every = 500
  c.eval.decode_examples = 256
  return c
