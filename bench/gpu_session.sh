#!/usr/bin/env bash
# The GPU check: the GPU tests and figures the open issues wait for, in one device call on a lent H100/H200. The
# image there (Python 3.12; its packages in bench/gpu-image.txt) has torch, Triton, transformers, CuPy, onnx,
# onnxruntime and pytest but not diffusers, and reaches no package index, so bench/gpu-requirements.txt's wheels
# travel in .whl/:
#   here, once:   make gpu-wheels
#   there:        run(carry=[".whl"], command="bash bench/gpu_session.sh all", timeout_s=430)
# all  ends by itself within GPU_CHECK_SECONDS (400) from a bare machine, which leaves a session's 15 device minutes
#      room to run it again at once on the warm machine. The wheels are installed once, up front (a failed install
#      stops the check with one line). Then the parts, in order of value, each under its own limit: at the limit
#      `timeout` sends SIGINT (pytest then writes its XML and tracebacks) and SIGKILL 15 s later; a failed part does
#      not stop the next, and the exit is non-zero if any failed:
#   envcheck   (35 s)  one line per package the check needs, as the image has it, then with the wheels (--strict)
#   gpu-tests  (210 s) pytest -m gpu -v over bench/gpu-tests.txt's files in its order (kernels at SD1.5 shapes
#                      first, the inductor compiles last), less the tests it deselects, each with its reason printed;
#                      ENGINE_GPU_CHECK=1 makes any other skip of a gpu test a failure
#   ops        (45 s)  python -m bench ops --device cuda: launch-inclusive and kernel-only times per SD1.5 shape
#   e2e-short  (85 s)  python -m bench --device cuda --preset sd15, batch 2, 30 steps: engine vs diffusers; the random
#                      SD1.5 weights (~3.4 GB) are built in the background from the start (`weights`)
#   trt        (45 s)  only where `python -m engine.trt.support` says some TensorRT here runs plans on this GPU
#                      (TensorRT for RTX's support matrix leaves out Hopper), else one line saying why, in no time: the
#                      tiny export built into plans here, generated with, and tests/test_export_trt.py's GPU tests
# Without a GPU every part ends within seconds and records its failure, and the weights are not built.
# $OUT (bench/results/<date>/ elsewhere) holds at most 6 files and no folder: stages.txt (each part's rc, seconds and
# limit), gpu-tests.xml, ops.json, e2e-short.json, logs.tar.gz (every part's log and the lesser files, re-packed
# after each part) and, while a part runs, its log. The last lines printed are a summary: stages.txt, the deselected
# tests and each pytest's closing line (a device call returns only the output's last 12,000 characters).
# Each part also runs alone (`bash bench/gpu_session.sh envcheck`, which runs here too), as do the stages that need a
# call of their own: weights; tests (the whole suite: GPU_CHECK_SECONDS=560, timeout_s=590); e2e (SD1.5 shapes, batch
# 1,2,4, all providers); e2e-edit; ladder; profile; trt-libs (TensorRT for RTX from .whl-trt into .trt-site for a
# later `trt` on the same machine: make gpu-wheels-trt here). Alone, a stage gets GPU_CHECK_SECONDS less 20 s.
# PYTHON (python3), WHEELS (.whl), BENCH_CACHE, GPU_CHECK_SECONDS and GPU_SESSION_SITE (/tmp/gpu-session-site)
# may be set.
set -uo pipefail
stages="all | envcheck | gpu-tests | ops | e2e-short | trt | weights | tests | e2e | e2e-edit | ladder | profile"
stages+=" | trt-libs"
stage=${1:?usage: bash bench/gpu_session.sh $stages}
out=${OUT:-bench/results/$(date +%Y%m%d)}
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
cache=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ipadapter-instruct-engine}
site=${GPU_SESSION_SITE:-/tmp/gpu-session-site}
deadline=${GPU_CHECK_SECONDS:-400}
grace=15  # seconds from a part's SIGINT to its SIGKILL
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
pytest_args=(-v -p no:cacheprovider -rfEs --tb=short --durations=30 --continue-on-collection-errors)
if "$py" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout=150); fi

# ---- the parts' commands: `bash $0 body NAME` runs body_NAME (in a process group `timeout` can interrupt) ----
body_envcheck() {
    echo "-- as the image has it (PYTHONPATH without the wheels):"
    PYTHONPATH=$GPU_SESSION_IMAGE_PYTHONPATH "$py" -m bench.envcheck
    echo "-- with the carried wheels:"
    "$py" -m bench.envcheck --strict
}

body_gpu_tests() {
    local text args
    "$py" -m bench.gpu_tests reasons && text=$("$py" -m bench.gpu_tests args) || return 1
    mapfile -t args <<< "$text"
    ENGINE_GPU_CHECK=1 "$py" -m pytest -m gpu "${pytest_args[@]}" --junitxml "$out/gpu-tests.xml" "${args[@]}"
}

body_ops() { "$py" -m bench ops --device cuda --json "$out/ops.json"; }

body_e2e_short() {
    "$py" -m bench --device cuda --preset sd15 --cache "$cache" --batch 2 --steps 30 --repeats 3 \
        --providers engine,diffusers --json "$out/e2e-short.json"
}

body_weights() {
    "$py" -c "import sys; from ipadapter_instruct.bench.weights import bench_weights; print(bench_weights('sd15', sys.argv[1]))" "$cache"
}

body_trt() {  # build the tiny plans on this machine, generate with them, then the GPU tests
    local tmp=$GPU_SESSION_LOGS/../trt arch rc cpp=export/cpp/build
    arch=$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)") || return 1
    rm -rf "$tmp" && mkdir -p "$tmp"
    "$py" -m engine make-tiny "$tmp/tiny" > /dev/null &&
    "$py" -m export onnx --model "$tmp/tiny/model" --image-encoder "$tmp/tiny/image_encoder" \
        --adapter "$tmp/tiny/adapter.safetensors" --out "$tmp/onnx" > /dev/null &&
    "$py" -m export trt "$tmp/onnx" --out "$tmp/plans" --arch "$arch" || return 1
    cp "$tmp/plans/engines.json" "$logs/trt-engines.json"
    "$py" -c "from PIL import Image; Image.new('RGB', (64, 64), (200, 40, 40)).save('$tmp/cond.png')"
    echo "generate --backend tensorrt (the line below is the image, or TensorRT's refusal of this GPU):"
    "$py" -m engine generate --model "$tmp/tiny/model" --image-encoder "$tmp/tiny/image_encoder" \
        --adapter "$tmp/tiny/adapter.safetensors" --image "$tmp/cond.png" --instruct "use the style of this image" \
        --steps 4 --backend tensorrt --engines "$tmp/plans" --out "$logs/trt-tiny.png" --no-progress
    ENGINE_GPU_CHECK=1 "$py" -m pytest -m gpu "${pytest_args[@]}" --junitxml "$logs/trt-tests.xml" \
        tests/test_export_trt.py
    rc=$?
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

body_trt_libs() {  # TensorRT for RTX from the carried .whl-trt into .trt-site (make gpu-wheels-trt)
    rm -rf .trt-site && mkdir -p .trt-site/tensorrt_rtx_libs &&
    "$py" -m pip install -q --no-index --no-deps --no-compile --target .trt-site .whl-trt/*.whl &&
    "$py" -c "import lzma, os, shutil
for name in os.listdir('.whl-trt/libs'):
    src, dst = os.path.join('.whl-trt/libs', name), os.path.join('.trt-site/tensorrt_rtx_libs', name)
    opener = lzma.open if name.endswith('.xz') else open
    with opener(src, 'rb') as f, open(dst.removesuffix('.xz'), 'wb') as g:
        shutil.copyfileobj(f, g)" &&
    PYTHONPATH="$PWD/.trt-site:$PYTHONPATH" "$py" -c "from ipadapter_instruct.engine.trt import load_tensorrt as l; t = l(); \
print(t.__name__, t.__version__)"
}

body_tests() { "$py" -m pytest "${pytest_args[@]}" --junitxml "$out/tests.xml" tests; }

body_e2e() {
    "$py" -m bench --device cuda --preset sd15 --cache "$cache" --batch 1,2,4 --json "$out/e2e.json" \
        --plot "$out/e2e.png"
}

body_e2e_edit() {
    "$py" -m bench --task edit --device cuda --preset sd15 --cache "$cache" --batch 1,2 --steps 30 --repeats 3 \
        --json "$out/e2e-edit.json"
}

body_ladder() {
    "$py" -m bench --device cuda --preset sd15 --cache "$cache" --batch 2 --repeats 5 --ladder --json "$out/ladder.json"
}

body_profile() {
    "$py" -m bench --device cuda --preset sd15 --cache "$cache" --batch 2 --steps 5 --repeats 3 \
        --providers engine,diffusers --profile "$logs/profile" --json "$out/profile.json"
}

if [ "$stage" = body ]; then
    logs=$GPU_SESSION_LOGS
    "body_${2//-/_}"
    exit
fi

# ---- around the parts: wheels, limits, logs, the summary ----
note() { echo "$*" | tee -a "$out/stages.txt"; }

pack() {  # every log so far into $out/logs.tar.gz (written beside, then moved: a cut-off leaves the last whole one)
    tar -czf "$logs.tar.gz" -C "$(dirname "$logs")" --warning=no-file-changed logs 2>/dev/null
    mv -f "$logs.tar.gz" "$out/logs.tar.gz"
}

install_wheels() {  # the carried wheels into $site, ahead of the image's packages; again only if they changed
    local have need t0=$SECONDS
    need=$(grep -cEv '^[[:space:]]*(#|$)' bench/gpu-requirements.txt)
    have=$(cd "$wheels" 2>/dev/null && ls -- *.whl 2>/dev/null)
    if [ -z "$have" ]; then
        [ "$need" = 0 ] && return 0
        note "== wheels: none in $wheels/, and bench/gpu-requirements.txt lists $need: make gpu-wheels here, then" \
             "carry [\".whl\"]"
        return 1
    fi
    if [ "$(cat "$site/.installed" 2>/dev/null)" != "$have" ]; then
        rm -rf "$site"
        if ! timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
                "$wheels"/*.whl 2>&1 | tee "$logs/wheels.log"; then
            note "== wheels: pip install --target $site of $wheels/*.whl failed (rc ${PIPESTATUS[0]}:" \
                 "$(tail -n 1 "$logs/wheels.log")): the check stops"
            return 1
        fi
        echo "$have" > "$site/.installed"
        note "== wheels: installed $(echo "$have" | wc -l) from $wheels/ into $site, $((SECONDS - t0)) s"
    else
        note "== wheels: installed earlier on this machine ($site)"
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
}

device_info() {  # one line, also into stages.txt; cuda=1 when torch sees a CUDA GPU
    local text
    text=$({ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
             echo "no nvidia-smi"; } | head -n 1)
    text="$text; $(timeout 120 "$py" -c "import torch, triton
gpu = torch.cuda.get_device_name(0) + ' (sm_%d%d)' % torch.cuda.get_device_capability() if torch.cuda.is_available() \
else 'none'
print(f'torch {torch.__version__}, triton {triton.__version__}, CUDA GPU: {gpu}')" 2>&1 | tail -n 1)"
    note "== device: $text"
    cuda=0
    [[ $text == *"CUDA GPU: "* && $text != *"CUDA GPU: none" ]] && cuda=1
    return 0
}

trt_runs_here() {  # rc 0 where some TensorRT here can run plans on this GPU; prints engine.trt.support's last line
    local said
    said=$(timeout 60 "$py" -m engine.trt.support 2>&1)
    local rc=$?
    echo "${said##*$'\n'}"
    return $rc
}

failed=0
part() {  # part NAME LIMIT: body_NAME under at most LIMIT s (less if the deadline is nearer), logged
    local name=$1 limit=$2 left t0 rc
    left=$((deadline - SECONDS - grace - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        note "== $name: not run: ${left} s left of ${deadline} s"
        failed=1
        return
    fi
    echo "== $name (limit ${limit} s, at ${SECONDS} s)"
    t0=$SECONDS
    # its own process group (timeout's), so the SIGINT reaches pytest; SIGINT restored in case it came ignored
    timeout -s INT -k "$grace" "$limit" "${default_int[@]}" bash "$0" body "$name" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    mv -f "$out/$name.log" "$logs/$name.log"
    note "== $name: rc $rc$( [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo " (timed out)"), $((SECONDS - t0)) s" \
         "(limit $limit s)"
    [ "$rc" = 0 ] || failed=1
    pack
}

summary() {  # the end of the output, which is all of it that a device call returns
    local log line
    echo "== summary (in $out: $(cd "$out" && ls | tr '\n' ' '))"
    cat "$out/stages.txt"
    grep -h "^gpu-tests: deselected " "$logs/gpu-tests.log" 2>/dev/null
    for log in "$logs"/*.log; do
        line=$(grep -E '^=+ .* in [0-9.]+s' "$log" 2>/dev/null | tail -n 1)
        [ -z "$line" ] || echo "$(basename "$log" .log): $line"
    done
}

finish() {
    note "== verdict: $( [ $failed = 0 ] && echo ok || echo FAILED ) ($stage, ${SECONDS} s)"
    pack
    summary
    rm -rf "$(dirname "$logs")"
    exit $failed
}

case " ${stages//|/ } " in *" $stage "*) ;; *) echo "unknown stage $stage: $stages" >&2; exit 2 ;; esac
mkdir -p "$out"
logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")/logs
mkdir -p "$logs"
export GPU_SESSION_LOGS=$logs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_SESSION_IMAGE_PYTHONPATH=$PYTHONPATH
[ -d "$PWD/.trt-site" ] && export PYTHONPATH="$PWD/.trt-site:$PYTHONPATH"  # from an earlier trt-libs call
default_int=()
env --default-signal=INT true 2>/dev/null && default_int=(env --default-signal=INT)
[ "$stage" = all ] && : > "$out/stages.txt"

if [ "$stage" != trt-libs ] && ! install_wheels; then
    [ "$stage" = envcheck ] || { failed=1; finish; }  # envcheck says what is missing
fi
[ "$stage" = trt-libs ] || device_info
case $stage in
    all)
        if [ $cuda = 1 ]; then  # the SD1.5 weights for e2e-short, built on half the cores while the GPU tests run
            (OMP_NUM_THREADS=8 timeout -k 10 240 bash "$0" body weights > "$logs/weights.log" 2>&1
             note "== weights (background): rc $?, done at ${SECONDS} s") &
        else
            note "== weights: not built: no CUDA GPU (e2e-short, which needs them, cannot run)"
        fi
        part envcheck 35
        part gpu-tests 210
        part ops 45
        wait
        part e2e-short 85
        if said=$(trt_runs_here); then
            part trt 45
        else
            note "== trt: not run: $said"
        fi
        finish ;;
    trt)
        said=$(trt_runs_here) || { note "== trt: not run: $said"; failed=1; finish; }
        part trt $((deadline - 20))
        finish ;;
    *)
        part "$stage" $((deadline - 20))
        finish ;;
esac
