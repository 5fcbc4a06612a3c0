# The two entry points a fresh machine needs: `make demo` and `make test`.
# Each creates .venv (if missing or stale) and installs gptjax into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo train-demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,train,quant,ref]'
	touch $(STAMP)

venv: $(STAMP)

# The GPT-4V -> GPT-4o-mini path on the built-in data: train the demo VLM (prints its test
# metrics and held-out samples), distil a 4x smaller student, prune, int8; runs/demo/report.md.
demo: $(STAMP)
	$(PY) -m gptjax.compress.recipe --config configs/mini_recipe.py --workdir runs/demo

# Only the demo VLM's training (the recipe's first stage).
train-demo: $(STAMP)
	$(PY) train.py --config configs/demo.py --workdir runs/demo_vlm

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
