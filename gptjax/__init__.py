"""gptjax: multimodal GPT models in JAX / Flax NNX, and the tools to make them small.

The public surface (everything else is internal and may move):

  ModelConfig, VisionConfig, preset, preset_names   model configuration
  GPT, VLM, from_config, count_params               models
  generate                                          sampling (also the module
                                                    ``gptjax.generate``)
  load_model(workdir)                               a trained model back from its workdir
  base_config()                                     the training config schema
                                                    (``gptjax.runs.train`` trains one)
"""
from gptjax.config import ModelConfig, VisionConfig, preset, preset_names
from gptjax.model import GPT, VLM, count_params, from_config
from gptjax import generate  # the module; it is also callable as the sampling function

__all__ = ["ModelConfig", "VisionConfig", "preset", "preset_names", "GPT", "VLM",
           "from_config", "count_params", "generate", "load_model", "base_config"]
__version__ = "0.1.0"

# Training and loading pull in orbax, grain and tensorflow-datasets: imported on first use,
# so that `import gptjax` for a model and sampling stays light (PEP 562).
_RUNS = ("load_model", "base_config")


def __getattr__(name):
  if name in _RUNS:
    from gptjax import runs
    return getattr(runs, name)
  raise AttributeError(f"module 'gptjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_RUNS))
