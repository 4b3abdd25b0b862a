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

# the wheels the GPU check needs that the GPU machine lacks (Python 3.12 there, no package index): exactly the list in
# bench/gpu-requirements.txt, which holds their missing dependencies too (--no-deps: nothing else comes along);
# for the full `tests` stage add GPU_EXTRA=onnxruntime-extensions==0.15.2 (its ONNX-plugin tests need it)
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl -r bench/gpu-requirements.txt $(GPU_EXTRA)

clean:
	rm -rf $(VENV) out .pytest_cache
