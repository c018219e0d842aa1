# flowerpress: `make demo` runs the default federation, `make test` runs the suite.
# Everything installs from nothing into .venv; torch is pinned to the CPU build
# in constraints.txt (a bare `torch` would pull several GB of CUDA packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Two workers, a file's tests on one of them, the long files first (tests/conftest.py).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install demo test test-slow check lint typecheck bench wheel clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -c constraints.txt torch==2.13.0
	$(PY) -m pip install -qq -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/flowerpress simulate --out runs/demo

test: install
	$(PY) -m ruff check flowerpress tests benchmarks examples
	$(PY) -m mypy
	# --dist loadfile: a file's tests share one worker, so a module-scoped fixture
	# (the composition matrix's engine, the SuperLink deployment) starts once.
	# (loadgroup's xdist_group marks are silently ignored under pytest 9.2,
	# pytest-xdist issue 1386: each worker then started its own matrix.)
	$(PYTEST) --durations=15 -m "not slow"

# The long end-to-end runs marked `slow` (deployments, killed ServerApps; `pytest -m slow
# --collect-only` lists them). CI runs them after `make test` (.ci/run); `make check` is both.
test-slow: install
	$(PYTEST) --durations=5 -m slow

check: test test-slow

lint: install
	$(PY) -m ruff check flowerpress tests benchmarks examples

typecheck: install
	$(PY) -m mypy

# The install route for devices without the package index: copy dist/*.whl to the
# device and `pip install` it there (docs/deploy.md, section 1).
wheel: install
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	@ls dist/flowerpress-*.whl

bench: install
	$(PY) benchmarks/round_overhead.py

clean:
	rm -rf $(VENV) runs dist .pytest_cache .mypy_cache
