# Run `make demo` for the end-to-end demo and `make test` for every test.
SHELL := /bin/bash
PYTHON ?= python3
DEMO_DURATION ?= 15m

export PYTHONPATH := $(CURDIR)

.PHONY: demo test check-binaries rules chart

# Installs Prometheus and Alertmanager from Debian when they are missing (needs root).
check-binaries:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || \
	    ! { command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; }; then \
	  echo "installing prometheus and prometheus-alertmanager with apt-get"; \
	  apt-get update && apt-get install -y --no-install-recommends prometheus prometheus-alertmanager; \
	fi

demo: check-binaries
	@venv=$$(PYTHON=$(PYTHON) tools/venv.sh) && \
	  "$$venv/bin/python" -m exporter.demo --duration $(DEMO_DURATION) $(if $(DEMO_KEEP),--keep)

# The project is installed in editable mode so the anomaly-exporter console script exists;
# PYTHONPATH still makes this checkout win when several clones share the virtualenv.
# The tensorflow extra is included because the equipment detector's autoencoder tests need it.
test:
	@venv=$$(PYTHON=$(PYTHON) VENV_EXTRAS=tensorflow tools/venv.sh) && \
	  "$$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . && \
	  "$$venv/bin/python" -m pytest -p no:cacheprovider

# Regenerates rules/anomaly-exporter.rules.yml from rules/render.py.
rules:
	@venv=$$(PYTHON=$(PYTHON) tools/venv.sh) && "$$venv/bin/python" -m rules.render

# Regenerates the chart's copies of the rules, the dashboards and the detector types.
chart:
	@venv=$$(PYTHON=$(PYTHON) tools/venv.sh) && "$$venv/bin/python" -m helm.generate
