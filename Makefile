# `make demo` runs the main job; `make test` runs the tests and the docstring examples; `make docs` builds the
# documentation site into site/. All set up .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench reliability venv clean calibration docs

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH)"
	# ... and kept: the extras (lightning, transformers, ...) install against the torch already there.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,examples]"
	touch $(STAMP)

venv: $(STAMP)

# The demo run gets a directory of its own (an earlier demo's event files would mix into its curves), then
# `lightwatch report` reads it back: the verdict and tables here, the plots in one HTML file.
DEMO_DIR := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/train.py hydra.run.dir=$(DEMO_DIR)
	@echo
	OMP_NUM_THREADS=1 $(PY) -m lightwatch report $(DEMO_DIR) --html $(DEMO_DIR)/report.html --color never
	@echo "Open the HTML report:  xdg-open $(DEMO_DIR)/report.html   (macOS: open $(DEMO_DIR)/report.html)"

# The tests, then the public-API tests again under `import lightning as L`: with LIGHTWATCH_TEST_LIGHTNING=lightning
# every `pytorch_lightning` import in the tests is `lightning.pytorch` (tests/conftest.py), and lightwatch's
# callbacks are bound to it.
API_TESTS := tests/test_gradient_stats.py tests/test_activation_stats.py tests/test_metric_monitor.py \
	tests/test_metric_checkpoint.py tests/test_data_quality.py tests/test_hydra.py tests/test_diagnoses.py \
	tests/test_loggers.py

# The `Example:` sections of the docstrings run as doctests too (tests/conftest.py does not apply to them).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests
	LIGHTWATCH_TEST_LIGHTNING=lightning OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not ddp" $(API_TESTS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --doctest-modules src/lightwatch -p no:cacheprovider

# The documentation site: docs/*.md and the API reference that mkdocstrings generates from the docstrings.
# --strict: a broken link, a missing page or a docstring mkdocstrings cannot read fails the build.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,examples,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# `make bench`: bare training against monitor=default, monitor=strict, each default callback alone, Lightning's
# grad_norm recipe and wandb.watch (offline; the `bench` extra), on the four workloads of bench/workloads.py at
# intervals 10 and 50, with the time inside lightwatch per hook and the peak extra memory. Short by default
# (2 rounds of 50 measured steps); the full run on a quiet machine: make bench BENCH_ARGS="--rounds 5 --measured 100".
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -c "import wandb" 2>/dev/null || $(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,examples,bench]"
	OMP_NUM_THREADS=1 $(PY) bench/policy_overhead.py --markdown outputs/policy_overhead.md \
		--json outputs/policy_overhead.json $(BENCH_ARGS)

# The reliability suite (crash, full disk, tampering, rank faults, bad input, a long run): about 30 minutes on two
# cores; the full-disk rows need root for a tmpfs mount. Parts: make reliability REL_ARGS="--part crash --trials 20"
REL_ARGS ?=
reliability: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bench.reliability $(REL_ARGS)

# The calibration corpus (healthy runs of third-party model families, to count false alarms) runs in its own
# venv: torchvision/timm next to the CPU torch need bench/calibration/torchvision_compat.py, and would break
# `import pytorch_lightning` in .venv (torchmetrics imports torchvision when it is installed).
CAL_VENV := .venv-calibration
CAL_PY := $(CAL_VENV)/bin/python
CAL_STAMP := $(CAL_VENV)/.installed
CAL_ARGS ?= --jobs 2

$(CAL_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(CAL_VENV)
	$(CAL_PY) -m pip install --quiet --upgrade pip
	$(CAL_PY) -m pip install --quiet "$(TORCH)"
	$(CAL_PY) -c "import torch; print('torch==' + torch.__version__)" > $(CAL_VENV)/constraints.txt
	$(CAL_PY) -m pip install --quiet -c $(CAL_VENV)/constraints.txt -e ".[dev,calibration]"
	touch $(CAL_STAMP)

calibration: $(CAL_STAMP)
	OMP_NUM_THREADS=1 $(CAL_PY) -m bench.calibration $(CAL_ARGS)

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache site
