# `make demo` runs the main job; `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean calibration

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

# The calibration corpus (healthy runs of third-party model families, to count false alarms) runs in its own
# venv: torchvision/timm next to the CPU torch need bench/calibration/torchvision_compat.py, and would break
# `import pytorch_lightning` in .venv (torchmetrics imports torchvision when it is installed).
CAL_VENV := .venv-calibration
CAL_PY := $(CAL_VENV)/bin/python
CAL_STAMP := $(CAL_VENV)/.installed
CAL_ARGS ?= --jobs 2

$(CAL_STAMP): pyproject.toml Makefile bench/calibration/constraints.txt
	$(PYTHON) -m venv $(CAL_VENV)
	$(CAL_PY) -m pip install --quiet --upgrade pip
	$(CAL_PY) -m pip install --quiet "$(TORCH)"
	$(CAL_PY) -m pip install --quiet -c bench/calibration/constraints.txt -e ".[dev,calibration]"
	touch $(CAL_STAMP)

calibration: $(CAL_STAMP)
	OMP_NUM_THREADS=1 $(CAL_PY) -m bench.calibration $(CAL_ARGS)

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache
