# mmf_plugins front door: `make demo` and `make test` (README). Everything installs into .venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check mmf_plugins tools tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
