"""Ctrl-C in every command: `python -m export trt` mid-build (TensorRT swallows a KeyboardInterrupt raised in its
callbacks: the build is cancelled through its progress monitor), `export onnx`, `train` and `bench` each end with
one line and exit 130, and leave no plan, graph or staging folder behind. (python -m engine: test_cli.py.)

`export trt` runs as a subprocess and gets SIGINT once it says it is building (a line it prints, unbuffered); the
others run in process (cheaper), a real SIGINT sent to the test process from inside their long phase."""
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ipadapter_instruct.engine import interrupt
from ipadapter_instruct.engine.interrupt import EXIT_INTERRUPTED
from ipadapter_instruct.engine.trt import tensorrt_unavailable
from test_cli import ctrl_c_in_c

NO_TRT = tensorrt_unavailable("rtx")
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT for RTX does not import: {NO_TRT}")
WIDTH = 64


def chain_export(folder, layers: int = 300, graphs=("first", "second")):
    """An export folder whose graphs are chains of MatMul + Relu (many layers: a build of a few seconds on a CPU)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ipadapter_instruct.export.onnx import FORMAT

    g = np.random.RandomState(0)
    nodes, weights, prev = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array((g.rand(WIDTH, WIDTH) * 0.01).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], weights)
    os.makedirs(folder)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.path.join(folder, "chain.onnx"))
    entry = {"file": "chain.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", WIDTH]}],
             "axes": {"batch": {"min": 1, "opt": 2, "max": 8}},
             "profiles": {"min": {"x": [1, WIDTH]}, "opt": {"x": [2, WIDTH]}, "max": {"x": [8, WIDTH]}}}
    manifest = {"format": FORMAT, "opset": 17, "dtype": "float32", "attention": "onnx",
                "graphs": {name: entry for name in graphs}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(folder)


def interrupt_when(cmd, pattern: bytes, then: float, timeout: float = 240):
    """Run cmd, SIGINT it `then` seconds after `pattern` shows in its output -> (returncode, stderr lines, seconds
    from the signal to its exit)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while pattern not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, (seen + proc.stderr.read()).decode()[-3000:]
            ready = select.select([proc.stdout, proc.stderr], [], [], 1.0)[0]
            for stream in ready:
                seen += os.read(stream.fileno(), 65536)
        time.sleep(then)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    return proc.returncode, lines, took


@needs_trt
def test_export_trt_mid_build(tmp_path):
    src = chain_export(tmp_path / "onnx")
    out = tmp_path / "plans"
    # the line is printed just before the build: a second later the process is inside TensorRT's C++ (a build of
    # 300 layers takes seconds of CPU; the signal lands in the first graph's build, or at worst the second's)
    code, lines, took = interrupt_when([sys.executable, "-m", "export", "trt", src, "--out", str(out), "--trt", "rtx"],
                                       b"first: building with", then=1.0)
    assert code == EXIT_INTERRUPTED and lines == ["python -m export trt: interrupted (Ctrl-C): stopped, no plan "
                                                  "written"], lines
    assert took < 20 and os.listdir(out) == []  # no plan, no engines.json, no staging folder


@needs_trt
def test_the_progress_monitor_cancels_the_build(tmp_path, monkeypatch):
    """In process: Ctrl-C just before the build (as the signal sets it) stops TensorRT at its first step: the
    monitor's step_complete says False once, and the builder asks no more."""
    from ipadapter_instruct.export import trt

    src = chain_export(tmp_path / "onnx", graphs=("first",))
    answers, real = [], trt.cancel_monitor

    def counting(module):
        monitor = real(module)
        ask = monitor.step_complete
        type(monitor).step_complete = staticmethod(lambda phase, step: answers.append(ask(phase, step)) or answers[-1])
        return monitor

    def log(line):
        if "building with" in line:
            interrupt._requested.set()
    monkeypatch.setattr(trt, "cancel_monitor", counting)
    interrupt._requested.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            trt.build_engines(src, str(tmp_path / "plans"), log=log, trt="rtx")
    finally:
        interrupt._requested.clear()
    assert answers == [False]  # (a whole build asks hundreds of times: once per layer in graph optimisation alone)
    assert os.listdir(tmp_path / "plans") == []


def ctrl_c() -> None:
    """A real SIGINT to this process: the guard's handler raises KeyboardInterrupt at the next Python line."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # (interrupted)
    raise AssertionError("SIGINT did not interrupt")


def run_main(main, args) -> int:
    try:
        return main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt (a traceback), not one line and exit 130")


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]


def test_export_onnx(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the exporter traces (in process: the signal comes from inside torch.onnx.export's tracing)."""
    from ipadapter_instruct.export import onnx
    from ipadapter_instruct.export.__main__ import main

    real = onnx.export_graph

    def export_graph(spec, path, opset):
        spec.module.register_forward_pre_hook(lambda *args: ctrl_c())
        return real(spec, path, opset)
    monkeypatch.setattr(onnx, "export_graph", export_graph)
    out = tmp_path / "onnx"
    code = run_main(main, ["onnx", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
                           tiny["adapter"], "--out", str(out), "--attention", "onnx", "--device", "cpu", "--graphs",
                           "projector"])
    assert code == EXIT_INTERRUPTED
    assert stderr_lines(capsys) == ["python -m export onnx: interrupted (Ctrl-C): stopped, no graph written"]
    assert os.listdir(tmp_path) == []  # neither OUT nor its staging folder beside it


def test_train(tiny, tmp_path, monkeypatch, capsys):
    from ipadapter_instruct.train import loop
    from ipadapter_instruct.train.__main__ import main
    from ipadapter_instruct.train.data import make_synthetic

    data = make_synthetic(str(tmp_path / "data"), 4, seed=0, size=32)
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self: ctrl_c())
    code = run_main(main, ["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", data,
                           "--out", str(tmp_path / "run"), "--steps", "10", "--batch-size", "2", "--val-fraction", "0",
                           "--resolution", "32", "--no-progress", "--device", "cpu"])
    assert code == EXIT_INTERRUPTED
    (line,) = stderr_lines(capsys)
    assert line.startswith("python -m train: interrupted (Ctrl-C): stopped; the checkpoints saved so far are kept")


def test_bench(tmp_path, monkeypatch, capsys):
    from ipadapter_instruct.bench import ops as bench_ops
    from ipadapter_instruct.bench.__main__ import main

    monkeypatch.setattr(bench_ops, "run_ops", lambda *args: ctrl_c())
    out = tmp_path / "ops.json"
    assert run_main(main, ["ops", "--device", "cpu", "--json", str(out)]) == EXIT_INTERRUPTED
    assert stderr_lines(capsys) == ["python -m bench ops: interrupted (Ctrl-C): stopped, no results written"]
    assert not out.exists()


def test_forced_exit_removes_registered_folders(tmp_path):
    """The main thread stuck in C (deaf to SIGINT) is ended by the watcher, and the folders and files registered as
    being written go first."""
    stage, part = tmp_path / "stage", tmp_path / "x.pt.tmp"
    setup = textwrap.dedent(f"""
        import os
        from ipadapter_instruct.engine import interrupt
        os.makedirs({str(stage)!r}); open(os.path.join({str(stage)!r}, "a.plan"), "w").close()
        open({str(part)!r}, "w").close()
        interrupt.remove_if_killed({str(stage)!r}); interrupt.remove_if_killed({str(part)!r})
    """)
    code, err, _ = ctrl_c_in_c(setup, 'interrupt.interrupt_guard(grace_s=0.5, message="stopped here")')
    assert code == EXIT_INTERRUPTED and err.strip() == "stopped here"
    assert not stage.exists() and not part.exists()


def test_polled_defers_the_interrupt():
    """Inside polled(), Ctrl-C sets requested() and raises nothing until the block ends."""
    with pytest.raises(KeyboardInterrupt):
        with interrupt.interrupt_guard():
            with interrupt.polled():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # (a Python handler runs between bytecodes: here, it only sets the flag)
                assert interrupt.requested()
                reached = True
    assert reached
