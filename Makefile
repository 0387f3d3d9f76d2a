# `make demo` runs the main job; `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,examples]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/train.py

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/overhead.py

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache
