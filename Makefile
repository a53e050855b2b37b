# The two commands of the README. Each creates .venv when it is missing.
# GPU users: create .venv and install your own CUDA torch into it first; the
# install step below only adds the CPU build (torch==2.13.0) when no torch imports.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.alignkd-installed
DEV_STAMP := $(VENV)/.alignkd-dev-installed
TORCH_CPU := torch==2.13.0

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# the test-only extras (pytest, hypothesis, moto's S3 server) only for `make test`: the
# demo does not need them, and installing them cost ~25 s of its 10-minute budget
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/alignkd demo

clean:
	rm -rf $(VENV) build *.egg-info
