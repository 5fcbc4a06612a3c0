"""gptjax's benchmarks: ``python -m benchmarks.run [--quick] [--only NAME ...]`` runs the
registered ones and writes BENCHMARKS.md + benchmarks/results.json; each module also runs
alone (``python benchmarks/X.py``)."""
