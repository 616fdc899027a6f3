# Two commands do everything on a fresh machine:  make demo   and   make test
# Every target installs what it needs first (once; stamps skip it afterwards).
# PROFILE=tiny (small random models of the same architecture) for serve and demo:
#   make serve PROFILE=tiny   # the whole stack in about a minute

PYTHON ?= python3.11
PROFILE ?= full
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
# Real checkpoints when models/ holds them, otherwise full-size random weights (said loudly).
WEIGHTS := $(if $(wildcard models/musetalkV15/unet.pth),--weights models,--synthetic)

.PHONY: demo test lint env triton-env export triton serve bench perf lint-docker clean

demo: env triton-env
	$(PY) -m stack.demo --profile $(PROFILE)

test: env triton-env lint
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check .

env: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -e ".[all,test]"
	touch $@

triton-env: $(TRITON_VENV)/.installed
$(TRITON_VENV)/.installed: triton_local/requirements.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(TRITON_VENV)/bin/python -m pip install -q -r triton_local/requirements.txt
	touch $@

export: env
	$(PY) -m export $(WEIGHTS)

triton: export triton-env
	$(PY) -m triton_local

serve: env triton-env
	$(PY) -m stack.serve --profile $(PROFILE)

bench: env
	$(PY) -m benchmarks.onnx_vs_pytorch

perf: env triton-env
	$(PY) -m benchmarks.perf_analyzer

lint-docker: env
	$(VENV)/bin/hadolint Dockerfile.triton

clean:
	rm -rf build
