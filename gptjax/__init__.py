"""gptjax: multimodal GPT models in JAX / Flax NNX, and the tools to make them small."""
from gptjax.config import ModelConfig, VisionConfig, preset, preset_names
from gptjax.model import GPT, VLM, count_params
from gptjax import generate

__all__ = ["ModelConfig", "VisionConfig", "preset", "preset_names", "GPT", "VLM",
           "count_params", "generate"]
__version__ = "0.1.0"
