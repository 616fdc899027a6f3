# Two commands do everything on a fresh machine:  make demo   and   make test
# Every target installs what it needs first (once; stamps skip it afterwards).
# PROFILE=tiny (small random models of the same architecture) for serve and demo:
#   make serve PROFILE=tiny   # the whole stack in about a minute

PYTHON ?= python3.11
PROFILE ?= full
VENV := .venv
TRITON_VENV := .venv-triton
PIPECAT_VENV := .venv-pipecat
PY := $(VENV)/bin/python
# Real checkpoints when models/ holds them, otherwise full-size random weights (said loudly).
WEIGHTS := $(if $(wildcard models/musetalkV15/unet.pth),--weights models,--synthetic)

.PHONY: demo test lint browser env triton-env pipecat-env export triton serve talk bench perf lint-docker clean

demo: env triton-env
	$(PY) -m stack.demo --profile $(PROFILE)

test: env triton-env pipecat-env browser lint
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check .

# The page tests need a real browser: Debian's chromium (Playwright's own download is not
# reachable everywhere). Installed when missing and we are root (CI); otherwise the page
# tests fail naming the package, unless MUSETALK_SKIP_BROWSER_TESTS=1 opts out of them.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the page tests..."; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "note: could not install chromium: the page tests will say so"; \
	  else echo "note: chromium is missing (apt-get install chromium): the page tests will fail" \
	    "(MUSETALK_SKIP_BROWSER_TESTS=1 skips them)"; fi; }

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

# Pipecat (the voice-agent integration, make talk) pins what the service cannot share an
# environment with: it gets its own, like the local Triton.
pipecat-env: $(PIPECAT_VENV)/.installed
$(PIPECAT_VENV)/.installed: pyproject.toml
	test -x $(PIPECAT_VENV)/bin/python || $(PYTHON) -m venv $(PIPECAT_VENV)
	$(PIPECAT_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(PIPECAT_VENV)/bin/python -m pip install -q -e ".[pipecat]"
	touch $@

export: env
	$(PY) -m export $(WEIGHTS)

triton: export triton-env
	$(PY) -m triton_local

serve: env triton-env
	$(PY) -m stack.serve --profile $(PROFILE)

# Talk to the avatar: the stack, and a Pipecat bot that repeats what you say (its page is printed).
talk: env triton-env pipecat-env
	$(PY) -m stack.talk --profile $(PROFILE)

bench: env
	$(PY) -m benchmarks.onnx_vs_pytorch

perf: env triton-env
	$(PY) -m benchmarks.perf_analyzer

lint-docker: env
	$(VENV)/bin/hadolint Dockerfile.triton

clean:
	rm -rf build
