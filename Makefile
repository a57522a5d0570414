# Two commands do all set-up on a fresh machine:
#   make quickstart   - install into .venv, generate synthetic data, run studies/quickstart.toml, report
#   make test         - install into .venv (with test extras), lint, and run the test suite
VENV ?= .venv
# Installs skip byte-compiling (--no-compile); let the first import cache what is really used,
# even where the environment disables .pyc writing (every CLI subprocess would recompile torch).
unexport PYTHONDONTWRITEBYTECODE
PY := $(VENV)/bin/python

.PHONY: quickstart test install dashboard

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first: the CPU wheel on disk; a bare "torch" requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/run-study search studies/quickstart.toml

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

dashboard: install
	$(VENV)/bin/run-study dashboard studies/quickstart.toml
