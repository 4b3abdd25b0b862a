# Two entry points: `make demo` (the engine alone: 2.3 GB of .venv, torch's 0.9 GB included) and `make test` (the dev
# extra on top: Ray, ONNX Runtime, TensorRT for RTX, Selenium, pytest). Each installs into .venv first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# With an NVIDIA GPU take pip's default (CUDA) torch; without one, the small CPU build.
TORCH  ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

# the tiny random weights `demo`, `serve --tiny` and the bench presets build once (engine/demo.py, bench/weights.py)
CACHE  ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ipadapter-instruct-engine

.PHONY: install install-base demo test clean gpu-wheels gpu-wheels-trt browser

install: $(VENV)/.installed
install-base: $(VENV)/.installed-base

# the engine and what it needs to generate; torch first, so that its requirement is met by the build chosen above
$(VENV)/.installed-base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

# everything the suite uses
$(VENV)/.installed: $(VENV)/.installed-base
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install-base
	$(PY) -m engine demo

# the suite in TEST_WORKERS processes (pytest-xdist), a test file to a process (its module fixtures built once);
# much of it waits on subprocesses, servers and the single-threaded Triton interpreter, so 2 fill 2 cores
TEST_WORKERS ?= 2
test: install browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# the web page's test drives a real headless Chromium: Debian's chromium and its chromedriver (installed once, as root)
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "the browser test needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; fi; }

# the wheels the GPU check needs that the GPU machine lacks (Python 3.12 there, no package index): exactly the list in
# bench/gpu-requirements.txt, which holds their missing dependencies too (--no-deps: nothing else comes along), into
# GPU_WHEELS (.whl, which a device call carries; tests/test_gpu_session.py downloads into a folder of its own);
# for the full `tests` stage add GPU_EXTRA=onnxruntime-extensions==0.15.2 (its ONNX-plugin tests need it)
GPU_WHEELS ?= .whl
gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) -r bench/gpu-requirements.txt $(GPU_EXTRA)

# TensorRT for RTX for the GPU machine, for `bash bench/gpu_session.sh trt-libs` (carry .whl-trt): the cp312 bindings
# wheel, and the libs wheel's two libraries xz-compressed (89 MB as a wheel, 60 MB as xz: under the 64 MiB a device
# call may carry, with the working tree). xz -9 takes about 3 minutes on 2 cores.
gpu-wheels-trt:
	rm -rf .whl-trt && mkdir -p .whl-trt/libs
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl-trt tensorrt-rtx-cu12-bindings==1.7.1.116 \
		tensorrt-rtx-cu12-libs==1.7.1.116
	cd .whl-trt && unzip -q -o tensorrt_rtx_cu12_libs-*.whl 'tensorrt_rtx_libs/*' -d unpacked && rm tensorrt_rtx_cu12_libs-*.whl
	for f in .whl-trt/unpacked/tensorrt_rtx_libs/*; do case $$f in *.so*) xz -9 -T0 -c $$f > .whl-trt/libs/$$(basename $$f).xz ;; \
		*) cp $$f .whl-trt/libs/ ;; esac; done
	rm -rf .whl-trt/unpacked && du -sh .whl-trt

clean:
	rm -rf $(VENV) out .pytest_cache build *.egg-info
	rm -rf "$(CACHE)"
	@echo "removed .venv, out/ and the tiny weights' cache $(CACHE)"
