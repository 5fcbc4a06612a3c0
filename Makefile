# The two entry points a fresh machine needs: `make demo` and `make test`.
# Each creates .venv (if missing, stale or broken) and installs gptjax into it first.
# `make test-min` checks the declared dependency floors in a separate .venv-min.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed
MIN_PINS := $(MIN_VENV)/floors.txt

.PHONY: demo train-demo test test-min venv clean

# A venv is usable when its python runs, is >= 3.11 and can import pip. A half-made one (an
# interrupted `python -m venv` or pip install, a deleted interpreter) fails this, so its
# stamp is dropped and the stamp rule below rebuilds it instead of trusting the stamp.
VENV_CHECK = -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))'
ifneq ($(shell $(PY) $(VENV_CHECK) >/dev/null 2>&1 && echo ok),ok)
  $(shell rm -f $(STAMP))
endif
ifneq ($(shell $(MIN_PY) $(VENV_CHECK) >/dev/null 2>&1 && echo ok),ok)
  $(shell rm -f $(MIN_STAMP))
endif

# $(call make_venv,DIR): (re)create DIR with $(PYTHON) unless it is already usable; stops
# with one clear line when $(PYTHON) is missing or older than 3.11.
define make_venv
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "gptjax needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>/dev/null || echo 'not found')." \
	       "Run with a newer one, e.g. make $(or $(MAKECMDGOALS),demo) PYTHON=python3.11"; exit 1; }
	@$(1)/bin/python $(VENV_CHECK) >/dev/null 2>&1 || { \
	  echo "Creating $(1) with $$(command -v $(PYTHON)) ($$($(PYTHON) --version 2>&1))"; \
	  rm -rf $(1) && $(PYTHON) -m venv $(1); }
	@echo "Python: $$($(1)/bin/python -c 'import sys; print(sys.executable, sys.version.split()[0])')"
endef

$(STAMP): pyproject.toml
	$(call make_venv,$(VENV))
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
	$(PY) -m pytest -q -n 2 --durations=15 -m "not smoke" tests

# The lowest versions pyproject.toml allows: pip has no "resolve to lowest" mode, so every
# core dependency's `>=FLOOR` becomes a `==FLOOR` pin (their own dependencies resolve as
# usual), gptjax goes in with --no-deps, and the smoke tests run against exactly that.
define FLOORS_PY
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for d in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)\s*>=\s*([^,;\s]+)\s*", d)
    if not m:
        sys.exit(f"pyproject.toml: dependency {d!r} has no plain '>=' floor to pin")
    print(f"{m[1]}=={m[2]}")
endef
export FLOORS_PY

# The version each pinned package actually has in .venv-min (and jaxlib, which jax pins).
define SHOW_PINS_PY
import re, sys
from importlib.metadata import version
names = [re.split(r"[\[=]", line)[0] for line in open(sys.argv[1]) if line.strip()]
for n in names + ["jaxlib"]:
    print(f"  {n:<22} {version(n)}")
endef
export SHOW_PINS_PY

$(MIN_STAMP): pyproject.toml
	$(call make_venv,$(MIN_VENV))
	@echo '*' > $(MIN_VENV)/.gitignore
	$(MIN_PY) -m pip install --quiet --upgrade pip
	$(MIN_PY) -c "$$FLOORS_PY" > $(MIN_PINS)
	$(MIN_PY) -m pip install --quiet -r $(MIN_PINS) 'pytest>=8'
	$(MIN_PY) -m pip install --quiet --no-deps -e .
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	@echo "Floors installed ($(MIN_PINS)):"
	@$(MIN_PY) -c "$$SHOW_PINS_PY" $(MIN_PINS)
	$(MIN_PY) -m pytest -q -p no:cacheprovider --durations=5 tests/test_smoke.py

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache
