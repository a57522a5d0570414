# Two commands do all set-up on a fresh machine:
#   make quickstart   - install into .venv, generate synthetic data, run studies/quickstart.toml, report
#   make test         - install into .venv (with test extras), lint, and run the test suite
VENV ?= .venv
# pip installs without byte-compiling (--no-compile, faster); compileall below then caches every module,
# even where the environment disables .pyc writing (every CLI subprocess would recompile torch).
unexport PYTHONDONTWRITEBYTECODE
PY := $(VENV)/bin/python

.PHONY: quickstart test install dashboard

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first: the CPU wheel on disk; a bare "torch" requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	# Byte-compile everything once (~11 s on 2 cores): where PYTHONDONTWRITEBYTECODE=1 is set, every run-study
	# process would otherwise compile torch & co. again (~9 s each). Some vendored test files do not compile.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/run-study search studies/quickstart.toml

test: install
	$(VENV)/bin/ruff check .
	# one test process per core (pytest-xdist), each pinned to its own cores (tests/conftest.py): much of the suite
	# waits on processes, signals and database restarts, so on 2 cores two at a time took 0.63x the wall time of one
	$(VENV)/bin/pytest -q -n auto

dashboard: install
	$(VENV)/bin/run-study dashboard studies/quickstart.toml
