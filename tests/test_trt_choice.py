"""Which TensorRT builds and runs the plans (`--trt auto|full|rtx`), what engines.json records about it (the builder
and the compute capabilities its plans run on), the refusals made from that record before any plan is deserialised,
and `python -m engine.trt.support`, which tells bench/gpu_session.sh whether its trt part can run.

The full TensorRT's libraries do not install on these machines (SPEC section 5), so its branch is exercised with a
fake `tensorrt` module put in sys.modules: that proves the selection logic (auto prefers it, --trt rtx ignores it, a
version older than 10 is passed over) and the refusals read from an engines.json that names it; it does not prove
that the full TensorRT's API builds or runs our plans. GPUs are simulated by monkeypatching torch.cuda's device
queries: that proves each refusal names the GPU, its compute capability and what to build instead, and comes before
TensorRT's deserialiser (a sentinel stands in for it); not how a real H100 behaves. Plans are real ones, built here
by TensorRT for RTX.
"""
import importlib.machinery
import json
import shutil
import sys
import types

import pytest
import torch

import ipadapter_instruct.engine.trt.runtime as rt
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.trt import (RTX_CCS, RTX_DEFAULT_CCS, import_tensorrt, installed, load_tensorrt, support,
                        tensorrt_unavailable)
from ipadapter_instruct.export import trt as export_trt
from test_export_plugin import export

NO_RTX = tensorrt_unavailable("rtx")
needs_rtx = pytest.mark.skipif(NO_RTX is not None, reason=f"TensorRT for RTX does not import: {NO_RTX}")
HAS_FULL = tensorrt_unavailable("full") is None
no_full = pytest.mark.skipif(HAS_FULL, reason="the full TensorRT is installed here: these check its absence")
H100 = ("NVIDIA H100 80GB HBM3", 90)
A100 = ("NVIDIA A100-SXM4-80GB", 80)
RTX_3090 = ("NVIDIA GeForce RTX 3090", 86)
FULL_INDEX = {"package": "tensorrt", "name": "TensorRT", "version": "10.13.0", "compute_capabilities": ["9.0"],
              "gpu": H100[0]}


@pytest.fixture(autouse=True)
def fresh_imports():
    """import_tensorrt remembers each package's import once per process: forget it around tests that fake one."""
    import_tensorrt.cache_clear()
    yield
    import_tensorrt.cache_clear()


def fake_full(monkeypatch, version="10.13.0"):
    """A stand-in for the full TensorRT's module: a name, a version and the IPluginV3 class the code looks for."""
    fake = types.ModuleType("tensorrt")
    fake.__version__, fake.IPluginV3 = version, type("IPluginV3", (), {})
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec reads it
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def on_gpu(monkeypatch, gpu):
    """torch.cuda says there is `gpu` = (name, compute capability as 90 for 9.0)."""
    name, cc = gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (cc // 10, cc % 10))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


class Deserialised(Exception):
    """Raised by the sentinel that stands in for TensorRTGraph: the runtime got as far as reading a plan."""


@pytest.fixture
def sentinel(monkeypatch):
    def graph(*args, **kwargs):
        raise Deserialised
    monkeypatch.setattr(rt, "TensorRTGraph", graph)
    monkeypatch.delenv(rt.PLUGIN_DIR_ENV, raising=False)  # from_engines sets it for the plugin: undone after


def one_line(text: str) -> str:
    assert len(text.strip().splitlines()) == 1, text
    return text.strip()


# ----- choosing the module -------------------------------------------------------------------------------------

@needs_rtx
def test_rtx_targets_are_what_its_bindings_can_target():
    t = load_tensorrt("rtx")
    enum = sorted(v.value for n, v in t.ComputeCapability.__members__.items() if n.startswith("SM"))
    assert tuple(enum) == RTX_CCS and 90 not in enum and 100 not in enum  # no Hopper, no datacenter Blackwell
    assert set(RTX_DEFAULT_CCS) == set(RTX_CCS) - {75}


def test_an_unknown_choice_is_one_line(tiny, capsys):
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.__main__ import main

    with pytest.raises(EngineError, match="unknown TensorRT choice trt='fast': choose one of auto, full, rtx"):
        load_tensorrt("fast")
    with pytest.raises(EngineError, match="unknown TensorRT choice trt='fast'"):
        Pipeline.from_pretrained(tiny["model"], backend="tensorrt", engines=tiny["model"], trt="fast")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", tiny["model"], "--backend", "tensorrt", "--trt", "fast"])
    assert e.value.code == 2 and "argument --trt: invalid choice: 'fast'" in one_line(capsys.readouterr().err)


def test_trt_without_the_tensorrt_backend_is_refused(tiny, tmp_path, capsys):
    from ipadapter_instruct.bench.__main__ import main as bench
    from ipadapter_instruct.engine import Pipeline
    from ipadapter_instruct.engine.__main__ import main

    with pytest.raises(EngineError, match="trt='rtx' chooses the TensorRT of backend='tensorrt'"):
        Pipeline.from_pretrained(tiny["model"], trt="rtx")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", tiny["model"], "--trt", "full", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "--trt full chooses the TensorRT of --backend tensorrt" in one_line(capsys.readouterr().err)
    assert bench(["--providers", "engine", "--trt", "rtx", "--json", str(tmp_path / "e.json")]) == 2
    assert "--trt rtx chooses the tensorrt provider's TensorRT" in one_line(capsys.readouterr().err)


@no_full
def test_full_asked_where_it_is_absent_names_its_install(export_dir, tmp_path):
    with pytest.raises(EngineError) as e:
        load_tensorrt("full")
    assert "the full TensorRT is not installed (" in str(e.value) and "pip install tensorrt-cu12" in str(e.value)
    res = export("trt", str(export_dir), "--out", str(tmp_path / "plans"), "--trt", "full")
    assert res.returncode == 2, res.stderr
    err = one_line(res.stderr)
    assert err.startswith("python -m export trt: error: the full TensorRT is not installed") and \
        "pip install tensorrt-cu12" in err and "--trt rtx" in err
    assert not (tmp_path / "plans").exists()


@no_full
@needs_rtx
def test_auto_and_rtx_pick_tensorrt_for_rtx_here():
    assert load_tensorrt("auto").__name__ == load_tensorrt("rtx").__name__ == "tensorrt_rtx_bindings"


@needs_rtx
def test_auto_prefers_a_full_tensorrt_and_rtx_ignores_it(monkeypatch):
    fake = fake_full(monkeypatch)
    assert load_tensorrt("auto") is fake and load_tensorrt("full") is fake
    assert load_tensorrt("rtx").__name__ == "tensorrt_rtx_bindings"
    import_tensorrt.cache_clear()
    fake_full(monkeypatch, "8.6.1")  # no IPluginV3 plugins from ONNX: passed over by auto, refused when asked for
    assert load_tensorrt("auto").__name__ == "tensorrt_rtx_bindings"
    with pytest.raises(EngineError, match=r"not installed \(tensorrt 8.6.1 is older than 10\)"):
        load_tensorrt("full")


# ----- what the build targets and records ----------------------------------------------------------------------

def test_build_targets():
    assert support.build_targets("rtx", None, None) == RTX_DEFAULT_CCS
    assert support.build_targets("rtx", [89, 86, 86], H100) == (86, 89)  # RTX builds anywhere, for what is asked
    with pytest.raises(EngineError, match=r"TensorRT for RTX cannot build for compute capability 9.0, 10.0 "
                                          r"\(it targets 7.5, 8.0, 8.6, 8.9, 12.0, 12.1\).*--trt full"):
        support.build_targets("rtx", [86, 90, 100], None)
    assert support.build_targets("full", None, H100) == support.build_targets("full", [90], H100) == (90,)
    with pytest.raises(EngineError, match="torch sees no CUDA GPU here.*--trt rtx"):
        support.build_targets("full", None, None)
    with pytest.raises(EngineError, match=r"run only on the GPU that builds them, here NVIDIA H100 80GB HBM3 "
                                          r"\(compute capability 9.0\): give --arch 90"):
        support.build_targets("full", [86], H100)
    with pytest.raises(EngineError, match="7.5 and newer; this GPU, Tesla V100-SXM2-16GB, is 7.0"):
        support.build_targets("full", None, ("Tesla V100-SXM2-16GB", 70))


@pytest.fixture(scope="module")
def export_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("choice") / "onnx"
    res = export("onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                 tiny["adapter"], "--out", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def plans(export_dir, tmp_path_factory):
    """Every graph built by TensorRT for RTX for compute capability 8.6 and 8.9 (asked 89, 86, 86)."""
    if NO_RTX:
        pytest.skip(f"TensorRT for RTX does not import: {NO_RTX}")
    out = tmp_path_factory.mktemp("choice") / "plans"
    res = export("trt", str(export_dir), "--out", str(out), "--arch", "89", "--arch", "86", "--arch", "86",
                 "--trt", "rtx")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_engines_json_records_the_builder_and_its_targets(plans):
    index = json.loads((plans / "engines.json").read_text())
    t = load_tensorrt("rtx")
    assert index["tensorrt"] == {"package": "tensorrt_rtx_bindings", "name": "TensorRT for RTX",
                                 "version": t.__version__, "compute_capabilities": ["8.6", "8.9"], "gpu": None}
    assert index["archs"] == ["sm_86", "sm_89"]  # the plugin's cubins: for the same GPUs
    variants = json.loads((plans / "plugin" / "index.json").read_text())["variants"]
    assert sorted({v["arch"] for v in variants}) == ["sm_86", "sm_89"]


@needs_rtx
def test_the_rtx_builder_config_targets_exactly_what_engines_json_says(export_dir, tmp_path, monkeypatch):
    """The default targets, as TensorRT for RTX's builder config holds them when each plan is built."""
    seen = []

    def spy(trt, config, ccs):
        real(trt, config, ccs)
        seen.append([config.get_compute_capability(i).value for i in range(config.num_compute_capabilities)])

    real = export_trt.target
    monkeypatch.setattr(export_trt, "target", spy)
    export_trt.build_engines(str(export_dir), str(tmp_path), graphs=["vae_decoder"], log=lambda line: None,
                             trt="rtx")
    index = json.loads((tmp_path / "engines.json").read_text())
    assert seen == [list(RTX_DEFAULT_CCS)]
    assert index["tensorrt"]["compute_capabilities"] == [support.cc_text(c) for c in RTX_DEFAULT_CCS]


def test_a_partial_rebuild_keeps_the_targets_and_says_what_it_leaves_out(plans, export_dir, tmp_path):
    folder = tmp_path / "plans"
    shutil.copytree(plans, folder)
    lines = []
    export_trt.build_engines(str(export_dir), str(folder), graphs=["vae_decoder"], log=lines.append, trt="rtx")
    index = json.loads((folder / "engines.json").read_text())
    assert index["tensorrt"]["compute_capabilities"] == ["8.6", "8.9"]  # no --arch: the plans already there
    assert sorted(index["graphs"]) == sorted(json.loads((plans / "engines.json").read_text())["graphs"])
    assert not [line for line in lines if "left out" in line]
    export_trt.build_engines(str(export_dir), str(folder), graphs=["vae_decoder"], archs=[120], log=lines.append,
                             trt="rtx")
    index = json.loads((folder / "engines.json").read_text())
    assert list(index["graphs"]) == ["vae_decoder"] and index["tensorrt"]["compute_capabilities"] == ["12.0"]
    assert "engines.json: the earlier plans of image_encoder, projector, text_encoder, unet are left out (their " \
           "tensorrt differ from this build's): rebuild them too" in lines


# ----- refusals from engines.json, before any plan is read ------------------------------------------------------

def test_rtx_plans_on_a_hopper_gpu_refuse_before_deserialising(plans, monkeypatch, sentinel):
    on_gpu(monkeypatch, H100)
    with pytest.raises(EngineError) as e:
        rt.TensorRTPipeline.from_engines(str(plans))
    assert one_line(str(e.value)) == (
        f"the plans in {plans} were built by TensorRT for RTX {load_tensorrt('rtx').__version__}, which runs on "
        "compute capability 7.5, 8.0, 8.6, 8.9, 12.0, 12.1; this GPU, NVIDIA H100 80GB HBM3, is 9.0: build the "
        f"plans with the full TensorRT (`pip install tensorrt-cu12`, then `python -m export trt ONNX_DIR --out "
        f"{plans} --trt full`) on this GPU")


def test_rtx_plans_on_an_rtx_gpu_they_do_not_target_say_which_arch(plans, monkeypatch, sentinel):
    on_gpu(monkeypatch, A100)
    with pytest.raises(EngineError, match=r"for compute capability 8.6, 8.9; this GPU, NVIDIA A100-SXM4-80GB, is "
                                          r"8.0: rebuild them for it with .* --arch 80`$"):
        rt.TensorRTPipeline.from_engines(str(plans))
    on_gpu(monkeypatch, RTX_3090)  # a GPU they target: TensorRT gets to say the rest
    with pytest.raises(Deserialised):
        rt.TensorRTPipeline.from_engines(str(plans))


def test_the_cli_says_the_refusal_in_one_line(plans, tiny, monkeypatch, capsys, sentinel, tmp_path, cond_image):
    from ipadapter_instruct.engine.__main__ import main

    on_gpu(monkeypatch, H100)
    image = tmp_path / "cond.png"
    cond_image.save(image)
    argv = ["generate", "--model", tiny["model"], "--image", str(image), "--instruct", "use the style",
            "--image-encoder", tiny["image_encoder"], "--adapter", tiny["adapter"], "--out", str(tmp_path / "o.png"),
            "--backend", "tensorrt", "--engines", str(plans)]
    assert main(argv) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: the plans in ") and "this GPU, NVIDIA H100 80GB HBM3, is 9.0" in err
    assert main([*argv, "--trt", "full"]) == 1
    assert "and the full TensorRT cannot deserialise them: use --trt rtx (or auto)" in one_line(capsys.readouterr().err)


@pytest.fixture
def full_plans(plans, tmp_path):
    """The RTX plans' folder with an engines.json that says the full TensorRT 10.13 built them on an H100."""
    folder = tmp_path / "full"
    shutil.copytree(plans, folder)
    index = json.loads((folder / "engines.json").read_text())
    (folder / "engines.json").write_text(json.dumps({**index, "tensorrt": FULL_INDEX}))
    return folder


@no_full
def test_full_plans_where_only_rtx_is_installed_name_the_install(full_plans, monkeypatch, sentinel):
    on_gpu(monkeypatch, H100)
    with pytest.raises(EngineError) as e:
        rt.TensorRTPipeline.from_engines(str(full_plans))
    err = one_line(str(e.value))
    assert err.startswith(f"the plans in {full_plans} were built by TensorRT 10.13.0 (engines.json), which does not "
                          "import here (ModuleNotFoundError")
    assert "pip install tensorrt-cu12" in err and "--trt rtx`)" in err
    with pytest.raises(EngineError, match="TensorRT for RTX cannot deserialise them: use --trt full"):
        rt.TensorRTPipeline.from_engines(str(full_plans), trt="rtx")


def test_full_plans_on_another_gpu_model_refuse(full_plans, monkeypatch, sentinel):
    on_gpu(monkeypatch, A100)
    with pytest.raises(EngineError) as e:
        rt.TensorRTPipeline.from_engines(str(full_plans))
    assert one_line(str(e.value)).startswith(
        f"the plans in {full_plans} were built by TensorRT 10.13.0 on NVIDIA H100 80GB HBM3 (compute capability "
        "9.0), and the full TensorRT's plans run only on the GPU model they were built on; this GPU, "
        "NVIDIA A100-SXM4-80GB, is 8.0: rebuild them on this GPU")
    assert str(e.value).endswith("(or --trt rtx, which builds without a GPU)")


@needs_rtx
def test_full_plans_load_with_the_full_tensorrt_on_their_gpu(full_plans, monkeypatch, sentinel):
    """With a (fake) full TensorRT, plans it built on this GPU model pass every check and reach the deserialiser."""
    fake = fake_full(monkeypatch)
    fake.Runtime = lambda logger: types.SimpleNamespace()
    fake.ILogger = type("ILogger", (), {"Severity": types.SimpleNamespace(ERROR=1, INTERNAL_ERROR=2, VERBOSE=0),
                                        "__init__": lambda self: None})
    monkeypatch.setattr(rt, "register_plugin", lambda trt: None)
    on_gpu(monkeypatch, H100)
    with pytest.raises(Deserialised):
        rt.TensorRTPipeline.from_engines(str(full_plans))


def test_a_runtime_without_a_validity_check_leaves_it_to_its_deserialiser():
    """The full TensorRT (10.x, 11.1) has no get_engine_validity: TensorRTGraph goes on to deserialise."""
    fake = types.SimpleNamespace(__name__="tensorrt")
    assert rt.cannot_run(fake, types.SimpleNamespace(), b"plan", "unet.plan", types.SimpleNamespace(errors=[])) is None


# ----- python -m engine.trt.support --------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_support_check_without_a_gpu_says_so_and_imports_no_tensorrt():
    import subprocess

    code = ("import sys; from ipadapter_instruct.engine.trt.support import main; rc = main([]); "
            "print(sorted(m for m in ('tensorrt', 'tensorrt_rtx_bindings') if m in sys.modules)); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stdout.splitlines() == ["no CUDA GPU: torch.cuda.is_available() is False, so no TensorRT plans can "
                                       "run here", "[]"]


@pytest.mark.parametrize("gpu, rtx, full, trt, rc, words", [
    (H100, True, False, "auto", 1, ["NVIDIA H100 80GB HBM3 (compute capability 9.0)",
                                    "the full TensorRT is not installed (`pip install tensorrt-cu12`)",
                                    "TensorRT for RTX runs on compute capability 7.5, 8.0, 8.6, 8.9, 12.0, 12.1"]),
    (H100, True, True, "auto", 0, ["the full TensorRT", "can build and run plans on NVIDIA H100", "--trt full"]),
    (H100, True, True, "rtx", 1, ["TensorRT for RTX runs on compute capability"]),
    (RTX_3090, True, False, "auto", 0, ["TensorRT for RTX", "runs plans on NVIDIA GeForce RTX 3090", "--arch 86"]),
    (RTX_3090, True, False, "full", 1, ["the full TensorRT is not installed"]),
    (RTX_3090, False, False, "auto", 1, ["the full TensorRT is not installed", "TensorRT for RTX is not installed "
                                         "(`pip install 'tensorrt-rtx-cu12-libs==1.7.1.116'"]),
])
def test_support_check_on_a_gpu(monkeypatch, capsys, gpu, rtx, full, trt, rc, words):
    if rtx and not installed("rtx"):
        pytest.skip("TensorRT for RTX is not installed")
    on_gpu(monkeypatch, gpu)
    if full:
        fake_full(monkeypatch)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # find_spec: not installed
    if not rtx:
        monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    assert support.main(["--trt", trt]) == rc
    out = one_line(capsys.readouterr().out)
    assert all(w in out for w in words), out
