# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# CPU-only machine (no nvidia-smi): the local CPU wheel of torch; elsewhere the normal (CUDA) one.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: venv demo demo-pipeline test test-fast test-faults lint dashboard clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The README's main command: a model learns chain-of-thought arithmetic from scratch on 2 CPU cores (README).
demo: venv
	bash scripts/demo_cot.sh

# The quick pipeline tour: the bundled BELLE sample through prepare, 2-rank training, export and generate.
demo-pipeline: venv
	bash scripts/demo.sh

lint: venv
	$(VENV)/bin/ruff check launcher trainer data_pipeline tracking sft_stack tests benchmarks
	$(VENV)/bin/ruff format --check launcher trainer data_pipeline tracking sft_stack tests benchmarks
	$(VENV)/bin/mypy

test: venv lint
	bash scripts/system_deps.sh
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -m "not slow" tests

# The fault drills and security checks alone (also part of `make test`); docs/RELIABILITY.md records them.
test-faults: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -m faults tests

# MLflow UI on a sqlite store: by default ./mlruns, where prepare and training log unless MLFLOW_TRACKING_URI or
# tracking.uri says otherwise (the demo keeps its own: make dashboard STORE=demo_cot_out/mlruns). Loopback unless HOST is set.
# Exposing it: docs/tracking.md (basic-auth app, --allowed-hosts, a TLS reverse proxy).
STORE ?= mlruns
HOST ?= 127.0.0.1
PORT ?= 5000
dashboard: venv
	$(PY) -m tracking dashboard --store $(STORE) --host $(HOST) --port $(PORT)

clean:
	rm -rf demo_out demo_cot_out .pytest_cache .mypy_cache .ruff_cache
