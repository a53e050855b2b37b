# The two commands of the README. Each creates .venv when it is missing.
# GPU users: create .venv and install your own CUDA torch into it first; the
# install step below only adds the CPU build (torch==2.13.0) when no torch imports.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.alignkd-installed
TORCH_CPU := torch==2.13.0

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/alignkd demo

clean:
	rm -rf $(VENV) build *.egg-info
