"""The plugin's shipped cubins launched without Triton: export/launch.py (CuPy, CUDA driver API) and the C++
program in export/cpp/, against `packed_attention_ref` at the SD1.5 shapes on a GPU.

Without a GPU: the C++ program compiles (and links where a libcuda is there), its host half (fp16 conversion,
the index.tsv lookup, the CPU attention in double) matches numpy and `packed_attention_ref`, and
`launch_variant` / `pick_variant` fail with errors that say what was asked and what exists.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import gpu
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.kernels.launch import launch_variant, pick_variant
from ipadapter_instruct.kernels.packed_attention import packed_attention_ref
from test_export_plugin import ROOT, export
from test_kernels_packed import make

CPP = os.path.join(ROOT, "export", "cpp")
CXX = os.environ.get("CXX", "g++")
SD15 = [(40, 4096), (80, 1024), (160, 256)]  # (head_dim, Lq) of a 512x512 image; B 2, 8 heads, Lt 77, Li 16
DTYPES = {"float16": torch.float16, "float32": torch.float32}
TSV_COLUMNS = ("arch", "dtype", "heads", "head_dim", "cubin", "kernel_name", "threads_per_block", "shared_bytes",
               "block_m")


def cuda_include():
    """A folder with cuda.h: the toolkit's, else the copy Triton ships; None if neither."""
    folders = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")]
    try:
        import triton
        folders.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include"))
    except ImportError:
        pass
    return next((f for f in folders if os.path.exists(os.path.join(f, "cuda.h"))), None)


def make_cpp(build, *targets):
    return subprocess.run(["make", "-C", CPP, f"BUILD={build}", f"CUDA_INCLUDE={cuda_include()}", f"CXX={CXX}",
                           *targets], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    if shutil.which(CXX) is None or shutil.which("make") is None:
        pytest.skip(f"needs a C++ compiler ({CXX}) and make")
    if cuda_include() is None:
        pytest.skip("needs cuda.h (CUDA_HOME/include, or the copy Triton ships)")
    return tmp_path_factory.mktemp("cpp")


def test_cpp_program_compiles(cpp_build):
    res = make_cpp(cpp_build, "compile")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning:" not in res.stderr, res.stderr[-3000:]
    assert (cpp_build / "attention.o").stat().st_size > 0


def build_or_skip(cpp_build):
    res = make_cpp(cpp_build)
    if res.returncode and "cannot find -lcuda" in res.stderr:
        pytest.skip("no libcuda to link against: neither a driver's libcuda.so.1 nor CUDA_HOME/lib64/stubs")
    assert res.returncode == 0, res.stderr[-3000:]


def test_cpp_program_links(cpp_build):
    build_or_skip(cpp_build)
    assert os.access(cpp_build / "attention", os.X_OK)


HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include "host.h"

int main(int, char** argv) {
    const std::string mode = argv[1];
    if (mode == "half") {  // half IN OUT: fp16 bits of each float32 in IN, then all 65536 fp16 patterns as float32
        FILE *in = std::fopen(argv[2], "rb"), *out = std::fopen(argv[3], "wb");
        for (float x; std::fread(&x, 4, 1, in) == 1;) {
            const uint16_t h = host::float_to_half(x);
            std::fwrite(&h, 2, 1, out);
        }
        for (uint32_t h = 0; h < 65536; ++h) {
            const float x = host::half_to_float(static_cast<uint16_t>(h));
            std::fwrite(&x, 4, 1, out);
        }
        return std::fclose(out);
    }
    if (mode == "ref") {  // ref OUT B LQ H D LT LI SCALE HALF: q k v k_ip v_ip scale out, float64
        const host::Shape s{std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6]),
                            std::atoi(argv[7]), std::atoi(argv[8])};
        const host::Inputs in = host::make_inputs(s, std::atof(argv[9]), std::atoi(argv[10]), 3);
        FILE* out = std::fopen(argv[2], "wb");
        for (const auto* t : {&in.q, &in.k, &in.v, &in.k_ip, &in.v_ip, &in.scale})
            for (double x : *t) std::fwrite(&x, 8, 1, out);
        const std::vector<double> o = host::attention(s, in);
        std::fwrite(o.data(), 8, o.size(), out);
        return std::fclose(out);
    }
    host::Variant v;  // find DIR ARCH DTYPE HEADS HEAD_DIM
    std::string error;
    if (!host::find_variant(argv[2], argv[3], argv[4], std::atoi(argv[5]), std::atoi(argv[6]), &v, &error)) {
        std::puts(error.c_str());
        return 2;
    }
    std::printf("%s %s %d %d %d\n", v.cubin.c_str(), v.kernel_name.c_str(), v.threads_per_block, v.shared_bytes,
                v.block_m);
    return 0;
}
"""


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    """export/cpp/host.h compiled into a small command-line program (no CUDA needed)."""
    if shutil.which(CXX) is None:
        pytest.skip(f"needs a C++ compiler ({CXX})")
    folder = tmp_path_factory.mktemp("harness")
    (folder / "harness.cpp").write_text(HARNESS)
    res = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-I", CPP, "-o", str(folder / "harness"),
                          str(folder / "harness.cpp")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "warning:" not in res.stderr, res.stderr[-3000:]
    return str(folder / "harness")


def test_cpp_fp16_conversion_matches_numpy(host_harness, tmp_path):
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, -7e4, 1e10, np.inf, -np.inf, np.nan, 2.0 ** -24,
             2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 1 + 2.0 ** -11,
             1 + 3 * 2.0 ** -11, 6.1e-5, -5.96e-8]
    any_bits = rng.integers(0, 2 ** 32, 100_000, dtype=np.uint32).view(np.float32)  # NaNs, infs, subnormals too
    spread = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-9, 6, 100_000)).astype(np.float32)
    x = np.concatenate([np.array(edges, np.float32), any_bits, spread])
    x.tofile(tmp_path / "in")
    subprocess.run([host_harness, "half", str(tmp_path / "in"), str(tmp_path / "out")], check=True, timeout=60)
    raw = (tmp_path / "out").read_bytes()
    bits = np.frombuffer(raw[:2 * x.size], np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(x)
    assert np.array_equal(bits[~nan], want[~nan].view(np.uint16))
    assert np.isnan(bits[nan].view(np.float16)).all()
    back = np.frombuffer(raw[2 * x.size:], np.float32)
    every = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    assert np.array_equal(back, every, equal_nan=True)


@pytest.mark.parametrize("shape,half", [((2, 37, 2, 40, 7, 5), 1), ((3, 19, 3, 80, 9, 1), 0),
                                        ((1, 5, 1, 160, 33, 16), 1)], ids=["d40-fp16", "d80-fp32", "d160-fp16"])
def test_cpp_cpu_reference_matches_packed_attention_ref(host_harness, tmp_path, shape, half):
    b, lq, heads, d, lt, li = shape
    out = tmp_path / "ref"
    subprocess.run([host_harness, "ref", str(out), *map(str, shape), "0.7", str(half)], check=True, timeout=60)
    flat = np.fromfile(out, np.float64)
    sizes = [b * lq * heads * d] + [b * lt * heads * d] * 2 + [b * li * heads * d] * 2 + [b, b * lq * heads * d]
    assert flat.size == sum(sizes)
    q, k, v, k_ip, v_ip, scale, got = np.split(flat, np.cumsum(sizes)[:-1])
    assert np.allclose(scale, 0.7 / np.arange(1, b + 1), rtol=1e-6)  # each batch row its own adapter scale
    inputs = np.concatenate([q, k, v, k_ip, v_ip])
    assert np.abs(inputs).max() <= 2 and (not half or np.array_equal(inputs.astype(np.float16), inputs))
    t = lambda a, n: torch.from_numpy(a).float().view(b, n, heads * d)  # noqa: E731
    want = packed_attention_ref(t(q, lq), t(k, lt), t(v, lt), t(k_ip, li), t(v_ip, li),
                                torch.from_numpy(scale).float(), heads)
    assert np.abs(want.double().flatten().numpy() - got).max() < 2e-5


@pytest.fixture
def fake_plugin(tmp_path):
    """A plugin folder's index.json and index.tsv (no cubins) listing sm_80 and sm_90 fp16 h8 d40."""
    variants = [dict(arch=f"sm_{a}", dtype="float16", heads=8, head_dim=40, cubin=f"p_sm{a}.cubin",
                     kernel_name="_packed_fwd_kernel", threads_per_block=256, shared_bytes=20480 + a, block_m=128)
                for a in (80, 90)]
    (tmp_path / "index.json").write_text(json.dumps({"variants": variants}))
    (tmp_path / "index.tsv").write_text("".join("\t".join(str(r[c]) for c in TSV_COLUMNS) + "\n"
                                                for r in [dict(zip(TSV_COLUMNS, TSV_COLUMNS)), *variants]))
    return str(tmp_path)


def test_cpp_index_lookup(host_harness, fake_plugin, tmp_path):
    find = lambda *a: subprocess.run([host_harness, "find", *map(str, a)], capture_output=True, text=True)  # noqa: E731
    res = find(fake_plugin, "sm_90", "float16", 8, 40)
    assert res.returncode == 0 and res.stdout.split() == ["p_sm90.cubin", "_packed_fwd_kernel", "256", "20570", "128"]
    res = find(fake_plugin, "sm_86", "float32", 8, 40)
    assert res.returncode == 2
    assert "no variant for sm_86 float32 heads=8 head_dim=40" in res.stdout
    assert "it has: sm_80 float16 h8 d40, sm_90 float16 h8 d40" in res.stdout
    res = find(tmp_path / "nothing", "sm_90", "float16", 8, 40)
    assert res.returncode == 2 and "python -m export plugin --out" in res.stdout


def test_pick_variant_says_what_was_asked_and_what_exists(fake_plugin, tmp_path):
    assert pick_variant(fake_plugin, "sm_80", "float16", 8, 40)["cubin"] == "p_sm80.cubin"
    with pytest.raises(EngineError, match=r"no variant for sm_86 float16 heads=8 head_dim=48 .*it has: "
                                          r"sm_80 float16 h8 d40, sm_90 float16 h8 d40 .*--arch 86") as e:
        pick_variant(fake_plugin, "sm_86", "float16", 8, 48)
    assert "\n" not in str(e.value)
    with pytest.raises(EngineError, match="no plugin index at .*python -m export plugin --out"):
        pick_variant(str(tmp_path / "nothing"), "sm_90", "float16", 8, 40)


def test_launch_variant_checks_shapes_then_wants_a_gpu(fake_plugin):
    args = make(2, 5, 2, 40, 3, 2, torch.float32, device="cpu")
    with pytest.raises(EngineError, match="not a multiple of heads=3"):
        launch_variant(fake_plugin, *args, 3)
    if torch.cuda.is_available():
        with pytest.raises(EngineError, match="must be on one CUDA device, got Q on cpu"):
            launch_variant(fake_plugin, *args, 2)
    else:
        with pytest.raises(EngineError, match="on a CUDA GPU, and torch sees none"):
            launch_variant(fake_plugin, *args, 2)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """`python -m export plugin` for this GPU's arch: both dtypes, the SD1.5 head sizes, 8 heads."""
    from ipadapter_instruct.export.plugin import ARCHS

    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor not in ARCHS:
        pytest.skip(f"the plugin is built for {', '.join(f'sm_{a}' for a in ARCHS)}, not this GPU's sm_{major}{minor}")
    out = tmp_path_factory.mktemp("plugin")
    res = export("plugin", "--out", str(out), "--arch", str(major * 10 + minor), "--dtype", "float16", "--dtype",
                 "float32", *[a for d, _ in SD15 for a in ("--head-dim", str(d))])
    assert res.returncode == 0, res.stderr[-2000:]
    return str(out)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lq", SD15)
def test_launch_variant_matches_reference_at_sd15_shapes(plugin_dir, dtype, d, lq):
    pytest.importorskip("cupy", reason="launch_variant loads the cubins with CuPy")
    args = make(2, lq, 8, d, 77, 16, DTYPES[dtype])
    exact = packed_attention_ref(*[a.float() for a in args], 8)
    got = launch_variant(plugin_dir, *args, 8)
    assert got.dtype == DTYPES[dtype] and got.shape == args[0].shape
    err = (got.float() - exact).abs().max().item()
    if dtype == "float16":  # flash-attention's rule: at most twice plain PyTorch's error in the same dtype
        bound = 2 * (packed_attention_ref(*args, 8).float() - exact).abs().max().item() + 5e-4
    else:
        bound = 1e-4
    assert err <= bound, f"cubin error {err:.3g}, allowed {bound:.3g}"


@gpu
def test_launch_variant_names_a_missing_variant(plugin_dir):
    pytest.importorskip("cupy", reason="launch_variant loads the cubins with CuPy")
    with pytest.raises(EngineError, match=r"no variant for sm_\d+ float16 heads=8 head_dim=64 .*it has: "):
        launch_variant(plugin_dir, *make(1, 3, 8, 64, 2, 2, torch.float16), 8)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lq", SD15)
def test_cpp_program_matches_the_cpu_at_sd15_shapes(plugin_dir, cpp_build, dtype, d, lq):
    build_or_skip(cpp_build)
    res = subprocess.run([str(cpp_build / "attention"), plugin_dir, "--dtype", dtype, "--head-dim", str(d),
                          "--lq", str(lq)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("OK"), res.stdout + res.stderr
