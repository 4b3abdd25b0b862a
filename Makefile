# Two entry points: `make demo` and `make test`. Each installs into .venv first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# With an NVIDIA GPU take pip's default (CUDA) torch; without one, the small CPU build.
TORCH  ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: install demo test clean gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) -m engine demo

test: install
	$(PY) -m pytest -q tests

# the wheels the GPU machine lacks (Python 3.12 there, no package index): see bench/gpu_session.sh
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		-d .whl diffusers==0.42.1 importlib_metadata onnxruntime-extensions==0.15.2

clean:
	rm -rf $(VENV) out .pytest_cache
