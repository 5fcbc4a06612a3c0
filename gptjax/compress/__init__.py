"""Compression: pruning, distillation, quantization and the teacher -> mini pipeline.

Submodules are imported explicitly (``from gptjax.compress import prune, distill, quantize``)
so that ``import gptjax`` never pulls in qwix.
"""
