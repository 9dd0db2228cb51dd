# Two commands for a fresh machine:  `make quickstart`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: quickstart test test-slow test-all install clean-runs benchmarks

# pip (not uv/poetry): on this class of machine it resolves torch from local wheels
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m brainenc.quickstart

# one worker per core (at most 4: each holds torch); a test file stays on one worker, so its
# module fixtures (trained tiny runs, the AFO smoke recipe) are built once
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

benchmarks: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean-runs:
	rm -rf runs/quickstart
