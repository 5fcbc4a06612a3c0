# The two entry points a fresh machine needs: `make demo` and `make test`.
# Each creates .venv (if missing or stale) and installs gptjax into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,train,quant]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config configs/demo.py --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
