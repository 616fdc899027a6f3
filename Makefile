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

.PHONY: demo test lint docs docs-serve debian-packages whip-server env triton-env pipecat-env export triton serve talk bench perf lint-docker clean

demo: env triton-env
	$(PY) -m stack.demo --profile $(PROFILE)

test: env triton-env pipecat-env debian-packages lint
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check .

# The documentation site (docs/, mkdocs.yml): built offline with --strict into build/site.
docs: env
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: env
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8088

# The tests use real parts from Debian: chromium (the page tests; Playwright's own download is not
# reachable everywhere), coturn (a TURN relay), nginx (a load balancer before two replicas, and with
# its RTMP module a streaming ingest), janus (a WebRTC SFU that sessions are published to over WHIP).
# Installed when missing and we are root (CI); otherwise the tests that need one fail naming
# the package (MUSETALK_SKIP_BROWSER_TESTS=1 opts out of the page tests).
# Each entry: package:what shows it is installed (a command, or a file).
DEBIAN_PACKAGES := chromium:chromium coturn:turnserver nginx-light:nginx janus:janus \
	libnginx-mod-rtmp:/usr/lib/nginx/modules/ngx_rtmp_module.so
debian-packages: whip-server
	@missing=""; for entry in $(DEBIAN_PACKAGES); do what="$${entry#*:}"; \
	  command -v "$$what" >/dev/null || [ -x "/usr/sbin/$$what" ] || [ -e "$$what" ] || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's$$missing for the tests..."; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
	      || echo "note: could not install$$missing: the tests that need them will say so"; \
	  else echo "note: missing$$missing (apt-get install$$missing): the tests that need them will fail"; fi; fi

# The WHIP endpoint in front of Janus (Janus' authors' simple-whip-server, from Debian's package):
# its package depends on Debian's nodejs, which conflicts with the Node.js many machines have, so
# its sources are unpacked from the .deb and its dependencies (pinned to Debian's versions, in
# stack/whip_server) come from npm. Two changes: it listens on loopback, and reads the config the
# tests write (WHIP_CONFIG) instead of /etc's.
WHIP_SERVER := build/whip-server
whip-server: $(WHIP_SERVER)/.installed
$(WHIP_SERVER)/.installed: stack/whip_server/package.json stack/whip_server/package-lock.json
	@command -v npm >/dev/null || { echo "note: npm is missing: the WHIP publishing tests will fail naming it"; exit 0; }; \
	set -e; rm -rf $(WHIP_SERVER); mkdir -p $(WHIP_SERVER)/deb; \
	cd $(WHIP_SERVER)/deb && { apt-get download -qq simple-whip-server >/dev/null 2>&1 || { apt-get update -qq && apt-get download -qq simple-whip-server; }; } && cd - >/dev/null; \
	dpkg-deb -x $(WHIP_SERVER)/deb/simple-whip-server_*.deb $(WHIP_SERVER)/deb/root; \
	cp -r $(WHIP_SERVER)/deb/root/usr/share/simple-whip-server/src $(WHIP_SERVER)/src; rm -f $(WHIP_SERVER)/src/config.js; \
	sed -i "s|require('./config.js')|require(process.env.WHIP_CONFIG)|; s|http.listen(config.port, function|http.listen(config.port, config.host, function|" $(WHIP_SERVER)/src/server.js; \
	grep -q "process.env.WHIP_CONFIG" $(WHIP_SERVER)/src/server.js && grep -q "config.port, config.host" $(WHIP_SERVER)/src/server.js; \
	cp stack/whip_server/package.json stack/whip_server/package-lock.json $(WHIP_SERVER)/; \
	cd $(WHIP_SERVER) && npm ci -s --no-audit --no-fund; cd - >/dev/null; touch $@

env: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -c constraints.txt -e ".[all,test]"
	touch $@

triton-env: $(TRITON_VENV)/.installed
$(TRITON_VENV)/.installed: triton_local/requirements.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	# onnxruntime-gpu replaced onnxruntime here: two packages writing one module break both
	$(TRITON_VENV)/bin/python -m pip uninstall -q -y onnxruntime
	$(TRITON_VENV)/bin/python -m pip install -q -r triton_local/requirements.txt
	touch $@

# Pipecat (the voice-agent integration, make talk) pins what the service cannot share an
# environment with: it gets its own, like the local Triton.
pipecat-env: $(PIPECAT_VENV)/.installed
$(PIPECAT_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PIPECAT_VENV)/bin/python || $(PYTHON) -m venv $(PIPECAT_VENV)
	$(PIPECAT_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(PIPECAT_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[pipecat]"
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
