"""Model compression: pruning (``gptjax.compress.prune``).

Submodules are imported explicitly, e.g. ``from gptjax.compress import prune``.
"""
