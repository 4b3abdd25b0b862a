#!/usr/bin/env bash
# Every GPU check and figure the open issues wait for, in few device calls (a session has 30 minutes of device
# time and 10 minutes a call). The GPU image has torch, triton, CuPy, onnx and onnxruntime, but not diffusers or
# onnxruntime-extensions, and reaches no package index, so their wheels travel in .whl/:
#   here, once:   make gpu-wheels
#   there:        device run, carry [".whl"], command `bash bench/gpu_session.sh STAGE` for each STAGE:
#     tests    the whole suite on the GPU (kernels at SD1.5 shapes, CUDA-graph capture, cubin and C++ launches)
#     ops      python -m bench ops: fused / plugin kernels against two SDPA calls, per SD1.5 shape
#     e2e      python -m bench at SD1.5 shapes, batch 1,2,4: engine, engine-eager, diffusers
#     ladder   the fast path one piece at a time (eager, +channels-last, +fused-attention, +fused-norms,
#              +cuda-graphs, +compile), batch 2: each step's effect
#     profile  one 5-step request at batch 2 per provider under torch.profiler: Chrome traces, top CUDA ops, and
#              how often each stage ran
# The first sd15 stage on a fresh machine also writes the random SD1.5 weights (~3.4 GB) once: run e2e before
# ladder (six providers, a torch.compile among them) so that ladder's 10 minutes go to measuring.
# Results land in $OUT (the device tool brings them back) or bench/results/<date>/ elsewhere, with the device.
set -euo pipefail
stage=${1:?usage: bash bench/gpu_session.sh tests|ops|e2e|ladder|profile}
out=${OUT:-bench/results/$(date +%Y%m%d)}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device-$stage.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device-$stage.txt"
e2e="python3 -m bench --preset sd15 --batch 1,2,4"
case $stage in
    tests)   python3 -m pytest -q -rs -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" ;;
    ops)     python3 -m bench ops --json "$out/ops.json" 2>&1 | tee "$out/ops.log" ;;
    e2e)     $e2e --json "$out/e2e.json" --plot "$out/e2e.png" 2>&1 | tee "$out/e2e.log" ;;
    ladder)  python3 -m bench --preset sd15 --batch 2 --repeats 5 --ladder --json "$out/ladder.json" 2>&1 | tee "$out/ladder.log" ;;
    profile) python3 -m bench --preset sd15 --batch 2 --steps 5 --repeats 3 --providers engine,diffusers \
                 --profile "$out/profile" --json "$out/profile.json" 2>&1 | tee "$out/profile.log" ;;
    *)       echo "unknown stage $stage: tests | ops | e2e | ladder | profile" >&2; exit 2 ;;
esac
