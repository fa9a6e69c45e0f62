# Run `make demo` for the end-to-end demo and `make test` for every test.
SHELL := /bin/bash
PYTHON ?= python3
DEMO_DURATION ?= 15m

export PYTHONPATH := $(CURDIR)

.PHONY: demo test check-binaries rules

# Installs Prometheus and Alertmanager from Debian when they are missing (needs root).
check-binaries:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || \
	    ! { command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; }; then \
	  echo "installing prometheus and prometheus-alertmanager with apt-get"; \
	  apt-get update && apt-get install -y --no-install-recommends prometheus prometheus-alertmanager; \
	fi

demo: check-binaries
	@venv=$$(PYTHON=$(PYTHON) tools/venv.sh) && \
	  "$$venv/bin/python" -m exporter.demo --duration $(DEMO_DURATION)

test:
	@venv=$$(PYTHON=$(PYTHON) tools/venv.sh) && \
	  "$$venv/bin/python" -m pytest -p no:cacheprovider

# Regenerates rules/anomaly-exporter.rules.yml from rules/render.py.
rules:
	@venv=$$(PYTHON=$(PYTHON) tools/venv.sh) && "$$venv/bin/python" -m rules.render
