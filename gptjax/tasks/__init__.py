"""Tasks built on a trained model and its data: image codes (a discrete image tokenizer),
the shapes image analyser, and the draw task (caption -> image codes) plumbing.

Floor: above ``gptjax.data``, below ``gptjax.train`` (see tests/test_layering.py).
"""
