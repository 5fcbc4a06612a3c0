"""Data: tokenizer, built-in TFDS datasets and the grain input pipeline."""
