#!/usr/bin/env bash
# The GPU checks and figures the open issues wait for. The GPU image has torch, triton, CuPy, onnx and onnxruntime
# but not diffusers, and reaches no package index, so the wheels of bench/gpu-requirements.txt travel in .whl/:
#   here, once:   make gpu-wheels
#   there:        device run, carry [".whl"], command `bash bench/gpu_session.sh all`, timeout_s 560
# all       ends by itself within 8.5 minutes (GPU_CHECK_SECONDS=510) on one H100/H200 from a bare machine; each
#           part has its own time limit, a failed part does not stop the next, and the exit is non-zero if any
#           failed. In order of value:
#   envcheck   one line per package the check needs (present and its version, or missing), Python/torch/Triton;
#              then the wheels are installed and checked again (--strict)
#   gpu-tests  pytest -m gpu: kernels at SD1.5 shapes, CUDA-graph capture and replay, the cubin launches, the fused
#              engine's latents, each ladder step against eager; ENGINE_GPU_CHECK=1 makes a skip a failure
#   ops        python -m bench ops: launch-inclusive and kernel-only (CUDA-graph) times per SD1.5 shape
#   trt        TensorRT: the tiny export built into plans here (TensorRT for RTX builds on the CPU), run with
#              --backend tensorrt, and the GPU tests of tests/test_export_trt.py (plans' latents against the
#              PyTorch path, CUDA graphs, the plugin's enqueue); where TensorRT refuses this GPU, its exact words
#              land in trt.log. Needs TensorRT for RTX in .trt-site/ from an earlier call on the same machine:
#                here, once:  make gpu-wheels-trt
#                there:       device run, carry [".whl-trt"], command `bash bench/gpu_session.sh trt-libs`
#              (the libraries are 57 MiB compressed: with the other wheels they exceed one call's 64 MiB), then,
#              while the machine is still warm, the `all` call. Without .trt-site the part fails with that reason.
#              With export/cpp/build carried too (the C++ plugin and unet_bench, built here against the TensorRT
#              headers), it also times the tiny UNet plan from C++ with the library inside it.
#   e2e-short  python -m bench at SD1.5 shapes, batch 2, 30 steps: engine vs diffusers
#   (the random SD1.5 weights, ~3.4 GB, are built once in the background from the start: stage `weights`)
# Separate stages, for another call each (they do not fit in `all`):
#   tests    the whole suite on the GPU
#   e2e      python -m bench at SD1.5 shapes, batch 1,2,4: engine, engine-eager, diffusers
#   ladder   the fast path one piece at a time, batch 2: each step's effect
#   e2e-edit InstructPix2Pix (python -m bench --task edit) at the sd15 IP2P preset's shapes, batch 1,2, 30 steps:
#            engine, engine-eager, diffusers' StableDiffusionInstructPix2PixPipeline
#   profile  one 5-step request at batch 2 per provider under torch.profiler
# Everything lands in $OUT as it goes (logs tee'd, JSON per stage, stages.txt with each part's rc and seconds), or
# in bench/results/<date>/ elsewhere. PYTHON (default python3), WHEELS (.whl) and BENCH_CACHE may be set.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh all|envcheck|gpu-tests|trt|ops|e2e-short|weights|trt-libs|tests|e2e|e2e-edit|ladder|profile}
out=${OUT:-bench/results/$(date +%Y%m%d)}
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
cache=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ipadapter-instruct-engine}
site=/tmp/gpu-session-site
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

trt_site() {  # TensorRT for RTX, unpacked by an earlier `trt-libs` call on this machine (an ignored folder, kept)
    [ -d "$PWD/.trt-site" ] && export PYTHONPATH="$PWD/.trt-site:$PYTHONPATH"
    return 0
}

install_wheels() {  # the carried wheels into $site, ahead of the image's packages; again only if the list changed
    local list
    trt_site
    list=$(cd "$wheels" 2>/dev/null && ls -- *.whl 2>/dev/null)
    [ -n "$list" ] || return 0
    if [ "$(cat "$site/.installed" 2>/dev/null)" != "$list" ]; then
        echo "installing $(echo "$list" | wc -l) wheels from $wheels into $site"
        rm -rf "$site"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "$wheels"/*.whl && echo "$list" > "$site/.installed"
    fi
    [ -f "$site/.installed" ] && export PYTHONPATH="$site:$PYTHONPATH"
    return 0
}

device_info() {
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
      "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
    } | tee "$out/device-$stage.txt"
}

# run PART BUDGET_S COMMAND...: at most BUDGET_S (less if the overall deadline is nearer), log to $out/PART.log
deadline=${GPU_CHECK_SECONDS:-510}
failed=0
run() {
    local part=$1 budget=$2 left t0 rc
    shift 2
    left=$((deadline - SECONDS - 15))  # the 15: timeout's -k 10 and the lines after
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -lt 10 ]; then
        echo "== $part: not run: ${left}s left of ${deadline}s" | tee -a "$out/stages.txt"
        failed=1
        return
    fi
    echo "== $part (limit ${budget}s, at ${SECONDS}s)"
    t0=$SECONDS
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$out/$part.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc (timed out after ${budget}s)"
    echo "== $part: rc $rc, $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
    [ "${rc%% *}" = 0 ] || failed=1
}

weights() { "$py" -c "import sys; from bench.weights import bench_weights; print(bench_weights('sd15', sys.argv[1]))" "$cache"; }
pytest_args=(-p no:cacheprovider -rfEs --tb=short --durations=30)
if "$py" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout=150); fi
# the GPU tests by value, so that a cut-off loses the least: the kernels at SD1.5 shapes first, then CUDA graphs, the
# cubin launches, then every other file in name order (pytest keeps the order of the files it is given)
gpu_files=(tests/test_kernels_attention.py tests/test_kernels_norms.py tests/test_kernels_packed.py
           tests/test_kernels_projector.py tests/test_graphs.py tests/test_export_launch.py)
for f in tests/test_*.py; do  # test_export_trt.py: in the trt part, with TensorRT on the path
    [[ " ${gpu_files[*]} " == *" $f "* ]] || [ "$f" = tests/test_export_trt.py ] || gpu_files+=("$f")
done

trt_check() {  # the trt part: build the tiny plans on this machine, generate with them, then the GPU tests
    local tmp=/tmp/gpu-session-trt arch
    trt_site
    "$py" -c "import sys; from engine.trt import tensorrt_unavailable as u; r = u(); print(r or 'TensorRT: ok'); \
sys.exit(1 if r else 0)" || { echo "no TensorRT here: carry .whl-trt in a first call running" \
        "\`bash bench/gpu_session.sh trt-libs\` (make gpu-wheels-trt makes it)"; return 1; }
    arch=$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)")
    rm -rf "$tmp" && mkdir -p "$tmp"
    "$py" -m engine make-tiny "$tmp/tiny" > /dev/null &&
    "$py" -m export onnx --model "$tmp/tiny/model" --image-encoder "$tmp/tiny/image_encoder" \
        --adapter "$tmp/tiny/adapter.safetensors" --out "$tmp/onnx" > /dev/null &&
    "$py" -m export trt "$tmp/onnx" --out "$tmp/plans" --arch "$arch" || return 1
    cp "$tmp/plans/engines.json" "$out/trt-engines.json"
    "$py" -c "from PIL import Image; Image.new('RGB', (64, 64), (200, 40, 40)).save('$tmp/cond.png')"
    echo "generate --backend tensorrt (the line below is the image, or TensorRT's refusal of this GPU):"
    "$py" -m engine generate --model "$tmp/tiny/model" --image-encoder "$tmp/tiny/image_encoder" \
        --adapter "$tmp/tiny/adapter.safetensors" --image "$tmp/cond.png" --instruct "use the style of this image" \
        --steps 4 --backend tensorrt --engines "$tmp/plans" --out "$out/trt-tiny.png" --no-progress
    ENGINE_GPU_CHECK=1 "$py" -m pytest -m gpu "${pytest_args[@]}" --junitxml "$out/trt-tests.xml" \
        tests/test_export_trt.py
    local rc=$? cpp=export/cpp/build
    # the C++ plugin and unet_bench, when built here and carried (make -C export/cpp plugin unet_bench
    # TRT_INCLUDE_DIR=...; carry export/cpp/build): the UNet plan with the library inside, timed from C++
    if [ -x "$cpp/unet_bench" ] && [ -f "$cpp/libipadapter_instruct_plugin.so" ]; then
        "$py" -m export trt "$tmp/onnx" --out "$tmp/plans-cpp" --graphs unet --arch "$arch" \
            --plugin-library "$cpp/libipadapter_instruct_plugin.so" > /dev/null &&
        LD_LIBRARY_PATH="$("$py" -c "import os, tensorrt_rtx_libs as l; print(os.path.dirname(l.__file__))"):${LD_LIBRARY_PATH:-}" \
        IPADAPTER_INSTRUCT_PLUGIN_DIR="$tmp/plans-cpp/plugin" "$cpp/unet_bench" "$tmp/plans-cpp/unet.plan" \
            --plugin "$cpp/libipadapter_instruct_plugin.so" --batch 2 --latent-height 16 --latent-width 16 \
            --warmup 3 --steps 20 || rc=1
    else
        echo "C++ plugin and unet_bench not carried (export/cpp/build): not run"
    fi
    return $rc
}

case $stage in
    all)
        : > "$out/stages.txt"
        device_info
        run envcheck 60 bash "$0" envcheck
        # the SD1.5 weights for e2e-short, built while the GPU tests run (CPU work; half the cores)
        wlimit=$((deadline - SECONDS - 30)); [ "$wlimit" -gt 300 ] && wlimit=300  # `wait` below ends by the deadline
        (OMP_NUM_THREADS=8 timeout -k 10 "$wlimit" bash "$0" weights > "$out/weights.log" 2>&1
         echo "== weights (background): rc $?, done at ${SECONDS}s" >> "$out/stages.txt") &
        wpid=$!
        run gpu-tests 220 bash "$0" gpu-tests
        run trt 70 bash "$0" trt
        run ops 60 bash "$0" ops
        wait "$wpid"
        run e2e-short 130 bash "$0" e2e-short
        echo "== all: $( [ $failed = 0 ] && echo ok || echo FAILED ), ${SECONDS}s" | tee -a "$out/stages.txt"
        exit $failed ;;
    envcheck)
        "$py" -m bench.envcheck | tee "$out/envcheck-image.txt"  # what is here before the wheels
        install_wheels
        "$py" -m bench.envcheck --strict | tee "$out/envcheck.txt" ;;
    weights)    install_wheels; weights ;;
    gpu-tests)  install_wheels
                ENGINE_GPU_CHECK=1 "$py" -m pytest -m gpu "${pytest_args[@]}" --junitxml "$out/gpu-tests.xml" \
                    "${gpu_files[@]}" ;;
    ops)        install_wheels; "$py" -m bench ops --json "$out/ops.json" ;;
    trt-libs)   # TensorRT for RTX from the carried .whl-trt into .trt-site (make gpu-wheels-trt; see `trt` above)
                rm -rf .trt-site && mkdir -p .trt-site/tensorrt_rtx_libs &&
                "$py" -m pip install -q --no-index --no-deps --no-compile --target .trt-site .whl-trt/*.whl &&
                "$py" -c "import lzma, os, shutil, sys
for name in os.listdir('.whl-trt/libs'):
    src, dst = os.path.join('.whl-trt/libs', name), os.path.join('.trt-site/tensorrt_rtx_libs', name)
    opener = lzma.open if name.endswith('.xz') else open
    with opener(src, 'rb') as f, open(dst.removesuffix('.xz'), 'wb') as g:
        shutil.copyfileobj(f, g)" && trt_site && "$py" -c "from engine.trt import load_tensorrt as l; t = l(); \
print(t.__name__, t.__version__)" ;;
    trt)        install_wheels; device_info; trt_check ;;
    e2e-short)  install_wheels
                "$py" -m bench --preset sd15 --cache "$cache" --batch 2 --steps 30 --repeats 3 \
                    --providers engine,diffusers --json "$out/e2e-short.json" ;;
    tests)      install_wheels; device_info
                "$py" -m pytest -q "${pytest_args[@]}" --junitxml "$out/tests.xml" tests 2>&1 | tee "$out/tests.log" ;;
    e2e)        install_wheels; device_info
                "$py" -m bench --preset sd15 --cache "$cache" --batch 1,2,4 --json "$out/e2e.json" \
                    --plot "$out/e2e.png" 2>&1 | tee "$out/e2e.log" ;;
    e2e-edit)   install_wheels; device_info
                "$py" -m bench --task edit --preset sd15 --cache "$cache" --batch 1,2 --steps 30 --repeats 3 \
                    --json "$out/e2e-edit.json" 2>&1 | tee "$out/e2e-edit.log" ;;
    ladder)     install_wheels; device_info
                "$py" -m bench --preset sd15 --cache "$cache" --batch 2 --repeats 5 --ladder \
                    --json "$out/ladder.json" 2>&1 | tee "$out/ladder.log" ;;
    profile)    install_wheels; device_info
                "$py" -m bench --preset sd15 --cache "$cache" --batch 2 --steps 5 --repeats 3 \
                    --providers engine,diffusers --profile "$out/profile" --json "$out/profile.json" 2>&1 \
                    | tee "$out/profile.log" ;;
    *)          echo "unknown stage $stage: all | envcheck | gpu-tests | trt | ops | e2e-short | weights | trt-libs |" \
                     "tests | e2e | e2e-edit | ladder | profile" >&2
                exit 2 ;;
esac
