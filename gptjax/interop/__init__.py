"""Weights in and out of other ecosystems (``hf_gpt2``: Hugging Face GPT-2)."""
