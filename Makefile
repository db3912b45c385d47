# make run   installs everything and starts a two-node LiteFS cluster on this machine
# make test  installs everything and runs lint, type checks and the whole test suite
# make bench runs the benchmark suite (prints ratios against a plain directory)
# make faults injects FAULTS random faults (default 1000) into a three-node etcd
#   cluster and prints one summary line (docs/operations.md, "Failure behaviour")
# make sqlite-tests builds SQLite's testfixture and runs its TCL tests in a mount
#   (docs/sqlite-tests.md; SQLITE_TESTS_ARGS="pager1 wal" picks files)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest bench faults sqlite-tests clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-packages
	scripts/install-system-packages
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m localcluster

lint: install
	$(VENV)/bin/ruff check litefs localcluster tests bench faults
	$(VENV)/bin/ruff format --check litefs localcluster tests bench faults

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: install
	$(PY) -m bench

FAULTS ?= 1000

faults: install
	$(PY) -m faults -faults $(FAULTS)

sqlite-tests: install
	scripts/sqlite-tests $(SQLITE_TESTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
