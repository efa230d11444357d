# weightsmith: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Both work on a fresh machine: they create .venv and install what they need first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WS     := $(VENV)/bin/weightsmith
STAMP  := $(VENV)/.installed
# GGUF conversions and input hashes are cached where the CLI caches them: $WEIGHTSMITH_CACHE, else
# ~/.cache/weightsmith
PYTEST_ARGS ?=
# test processes (pytest-xdist), one compute thread each: on a 2-core machine this keeps both cores busy
TEST_WORKERS ?= 2

.PHONY: demo test install bench bench-assets clean

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	PYTHON=$(PYTHON) ./scripts/install.sh $(VENV)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(WS) demo out/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/baseline.py

# optional second bench model (Gemma-3-270M, Gemma terms of use; docs/second-model.md); tests never need it
bench-assets: $(STAMP)
	PYTHON=$(PYTHON) ./scripts/install.sh $(VENV) --bench-assets

clean:
	rm -rf out .pytest_cache
