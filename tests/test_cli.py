"""`python -m engine`: the exact CLI contract, images equal to the Python API's, one-line errors, checks before any
weights load, Ctrl-C, and no output left behind on failure."""
import io
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from ipadapter_instruct.engine import EngineError, output
from ipadapter_instruct.engine.__main__ import EXIT_INTERRUPTED, INTERRUPTED, main


@pytest.fixture
def gen_args(tiny, tmp_path, cond_image):
    image = tmp_path / "cond.png"
    cond_image.save(image)
    return ["generate", "--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--adapter",
            tiny["adapter"], "--image", str(image), "--prompt", "a cat", "--negative-prompt", "blurry",
            "--instruct", "take the object", "--steps", "2", "--seed", "0", "--no-progress",
            "--out", str(tmp_path / "out.png")]


@pytest.fixture
def text_args(tiny, tmp_path):
    return ["generate", "--model", tiny["model"], "--prompt", "a cat", "--steps", "2", "--seed", "0", "--no-progress",
            "--out", str(tmp_path / "out.png")]


@pytest.fixture(scope="module")
def text_pipe(tiny):
    from ipadapter_instruct.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny["model"], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# what gen_args asks for, as Python API arguments
API_BASE = dict(prompt="a cat", negative_prompt="blurry", instruct="take the object", num_inference_steps=2, seed=0)


@pytest.fixture(scope="module")
def api_base(instruct_pipe, cond_image):
    return pixels(instruct_pipe(image=cond_image, **API_BASE))


def pixels(images):
    return [np.asarray(im.convert("RGB")) for im in images]


def read(paths):
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def within_one_level(a, b):
    """Another process may run other torch thread counts (make test's workers share the cores out), whose float
    sums round differently: one grey level, the suite's rule across thread counts and batch shapes."""
    return len(a) == len(b) and all(x.shape == y.shape and np.abs(x.astype(int) - y.astype(int)).max() <= 1
                                    for x, y in zip(a, b))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "cond.png")


def set_arg(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def drop_arg(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_generate_subprocess_equals_api(gen_args, tmp_path, instruct_pipe, cond_image):
    args = gen_args + ["--scale", "0.7", "--guidance-scale", "5", "--instruct-guidance-scale", "4",
                       "--image-guidance-scale", "1.5", "--guidance-mode", "full", "--seed", "3", "--height", "32",
                       "--width", "48", "--scheduler", "euler_a", "--device", "cpu", "--dtype", "float32"]
    done = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (48, 32) and im.format == "PNG"
    want = instruct_pipe(image=cond_image, **{**API_BASE, "scale": 0.7, "guidance_scale": 5,
                         "instruct_guidance_scale": 4, "image_guidance_scale": 1.5, "guidance_mode": "full",
                         "seed": 3, "height": 32, "width": 48, "scheduler": "euler_a"})
    assert within_one_level(read([tmp_path / "out.png"]), pixels(want))


# every generation flag with a value other than its default: the CLI's images must equal the API's for the same
# value, and differ from the defaults' (so a flag the CLI ignored would fail)
FLAGS = [("--scale", "0.5", "scale", 0.5), ("--guidance-scale", "3", "guidance_scale", 3.0),
         ("--instruct-guidance-scale", "2", "instruct_guidance_scale", 2.0),
         ("--image-guidance-scale", "2.5", "image_guidance_scale", 2.5),
         ("--guidance-mode", "simple", "guidance_mode", "simple"), ("--steps", "3", "num_inference_steps", 3),
         ("--seed", "5", "seed", 5), ("--height", "32", "height", 32), ("--width", "48", "width", 48),
         ("--scheduler", "euler_a", "scheduler", "euler_a"), ("--num-images", "2", "num_images_per_prompt", 2),
         ("--negative-prompt", "ugly", "negative_prompt", "ugly"),
         ("--instruct", "keep the composition", "instruct", "keep the composition"),
         ("--prompt", "a dog", "prompt", "a dog")]


@pytest.mark.parametrize("flag,value,key,api_value", FLAGS, ids=[f[0] for f in FLAGS])
def test_flag_reaches_the_pipeline(gen_args, tmp_path, capsys, instruct_pipe, cond_image, api_base,
                                   flag, value, key, api_value):
    assert main(set_arg(gen_args, flag, value)) == 0
    paths = capsys.readouterr().out.split()
    want = pixels(instruct_pipe(image=cond_image, **{**API_BASE, key: api_value}))
    assert same(read(paths), want)
    assert not same(want, api_base), f"{flag} {value} does not change the image, so this test could not fail"


@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_text_only_in_every_format(text_args, tmp_path, capsys, text_pipe, ext, fmt):
    out = tmp_path / f"out{ext}"
    assert main(set_arg(text_args, "--out", str(out))) == 0
    want = io.BytesIO()  # the API's image through the same encoder
    text_pipe(prompt="a cat", num_inference_steps=2, seed=0)[0].save(want, format=fmt)
    with Image.open(out) as im:
        assert im.format == fmt
    assert same(read([out]), read([want]))


def test_several_images(gen_args, tmp_path, capsys):
    assert main(gen_args + ["--num-images", "2"]) == 0
    assert leftovers(tmp_path) == ["out-0.png", "out-1.png"]


@pytest.mark.parametrize("flag,value,message,code", [
    ("--model", "/nonexistent/model", "base model not found", 1),
    ("--adapter", "CORRUPT", "cannot read adapter", 1),
    ("--image", "NOTANIMAGE", "cannot read condition image", 1),
    ("--image", "/nonexistent/cond.png", "condition image not found", 1),
    ("--instruct", "  ", "instruction is empty", 1),
    ("--steps", "0", "expected a positive integer, got 0", 2),
    ("--steps", "1000", "fewer than the scheduler's", 1),
    ("--scheduler", "heun", "invalid choice: 'heun'", 2),
    ("--out", "OUT.gif", "--out must name a .png, .jpg, .jpeg or .webp file", 1),
    ("--height", "30", "multiples of the VAE factor 4", 1),
])
def test_bad_input(gen_args, tmp_path, capsys, flag, value, message, code):
    if value == "CORRUPT":
        value = str(tmp_path / "corrupt.safetensors")
        open(value, "wb").write(b"garbage" * 20)
    if value == "NOTANIMAGE":
        value = str(tmp_path / "fake.png")
        open(value, "w").write("not a png")
    if value == "OUT.gif":
        value = str(tmp_path / "out.gif")
    args = set_arg(gen_args, flag, value)
    if code == 2:
        with pytest.raises(SystemExit) as ex:
            main(args)
        assert ex.value.code == code
    else:
        assert main(args) == code
    assert message in one_line_error(capsys)
    assert leftovers(tmp_path) == [p for p in ("corrupt.safetensors", "fake.png") if (tmp_path / p).exists()]


@pytest.mark.parametrize("edit,message", [
    (lambda a: drop_arg(a, "--image-encoder"), "--adapter needs --image-encoder"),
    (lambda a: drop_arg(a, "--image"), "--adapter needs --ip-adapter-image"),
    (lambda a: drop_arg(a, "--adapter"), "--image-encoder and --ip-adapter-image and --instruct need --adapter"),
])
def test_flag_combinations(gen_args, capsys, edit, message):
    with pytest.raises(SystemExit) as ex:
        main(edit(gen_args))
    assert ex.value.code == 2 and message in one_line_error(capsys)


@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights says so: a check that comes before it shows its own message instead."""
    from ipadapter_instruct.engine.pipeline import Pipeline

    def refuse(*args, **kwargs):
        raise EngineError("WEIGHTS LOADED")
    monkeypatch.setattr(Pipeline, "from_pretrained", refuse)


def unwritable_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder) if not os.access(folder, os.W_OK) else "/proc"  # root may write anywhere but /proc


@pytest.mark.parametrize("edit,message", [
    (lambda a, d: set_arg(a, "--out", str(d / "missing" / "out.png")), "output folder does not exist"),
    (lambda a, d: set_arg(a, "--out", os.path.join(unwritable_folder(d), "out.png")), "output folder is not writable"),
    (lambda a, d: set_arg(a, "--out", str(d / "out.gif")), "--out must name a"),
    (lambda a, d: (d / "out.png").write_bytes(b"old") and a, "output file exists"),
    (lambda a, d: (d / "out-1.png").write_bytes(b"old") and a + ["--num-images", "2"], "output file exists"),
    (lambda a, d: (d / "out.png").mkdir() or a, "output path is a folder"),
    (lambda a, d: a + ["--height", "100000"], "over the maximum"),
    (lambda a, d: a + ["--width", "100000"], "over the maximum"),
    (lambda a, d: a + ["--height", "100000", "--max-size", "100000"], "WEIGHTS LOADED"),
    (lambda a, d: set_arg(a, "--image", str(d / "none.png")), "condition image not found"),
])
def test_checked_before_loading(gen_args, tmp_path, capsys, no_loading, edit, message):
    args = edit(gen_args, tmp_path)
    before = leftovers(tmp_path)
    assert main(args) == 1
    assert message in one_line_error(capsys)
    assert leftovers(tmp_path) == before


def test_overwrite(text_args, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(text_args) == 0
    assert capsys.readouterr().err == "seed: 0\n"  # (the seed used, one line on stderr)
    first = out.read_bytes()
    assert main(set_arg(text_args, "--seed", "1")) == 1
    assert "output file exists" in one_line_error(capsys) and out.read_bytes() == first
    assert main(set_arg(text_args, "--seed", "1") + ["--overwrite"]) == 0
    assert out.read_bytes() != first and leftovers(tmp_path) == ["out.png"]


def test_write_refuses_a_file_that_appeared(tmp_path, cond_image):
    """Two runs racing for one --out: the name is checked again when the file is put in place."""
    path = tmp_path / "out.png"
    paths = output.output_paths(str(path), 1)
    path.write_bytes(b"the other run's image")  # appears between the first check and the write
    with pytest.raises(EngineError, match="output file exists"):
        output.write_images([cond_image], paths)
    assert path.read_bytes() == b"the other run's image" and leftovers(tmp_path) == ["out.png"]


def test_pipeline_refuses_oversize(instruct_pipe, text_pipe, cond_image):
    native = text_pipe.unet.config.sample_size * text_pipe.vae_scale_factor
    with pytest.raises(EngineError, match="over the maximum"):
        instruct_pipe(image=cond_image, **API_BASE, height=100000)
    big = native * 4 + text_pipe.vae_scale_factor
    with pytest.raises(EngineError, match=f"over the maximum {native * 4} px"):
        text_pipe("a cat", height=big, num_inference_steps=1, output_type="latent")
    latents = text_pipe("a cat", height=big, num_inference_steps=1, output_type="latent", max_size=big)
    assert latents.shape[-2:] == (big // text_pipe.vae_scale_factor, native // text_pipe.vae_scale_factor)


def test_failure_after_first_image_leaves_nothing(gen_args, tmp_path, capsys, monkeypatch):
    save, calls = Image.Image.save, []

    def save_then_fail(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save(self, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    assert main(gen_args + ["--num-images", "3"]) == 1
    assert "No space left on device" in one_line_error(capsys) and len(calls) == 2
    assert leftovers(tmp_path) == []


def test_failure_while_renaming_removes_the_renamed(gen_args, tmp_path, capsys, monkeypatch):
    place, calls = output._place, []

    def place_then_fail(tmp, path, overwrite):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        place(tmp, path, overwrite)
    monkeypatch.setattr(output, "_place", place_then_fail)
    assert main(gen_args + ["--num-images", "2"]) == 1
    assert "Input/output error" in one_line_error(capsys) and len(calls) == 2
    assert leftovers(tmp_path) == []


def test_ctrl_c_in_the_loop(tiny, tmp_path):
    """A real SIGINT in the denoising loop: one line, exit 130, no output file and no temporary."""
    cmd = [sys.executable, "-m", "engine", "generate", "--model", tiny["model"], "--prompt", "a cat", "--steps", "999",
           "--out", str(tmp_path / "out.png")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err, deadline = b"", time.monotonic() + 240
    try:
        while not re.search(rb"\| +[1-9]\d*/\d+ ", err):  # tqdm has counted a step: we are in the loop
            assert time.monotonic() < deadline and proc.poll() is None, err.decode(errors="replace")[-2000:]
            if select.select([proc.stderr], [], [], 1.0)[0]:
                err += os.read(proc.stderr.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [x for x in re.split(r"[\r\n]+", (err + rest).decode()) if x.strip() and not x.startswith("denoise")]
    assert lines == [INTERRUPTED] and proc.returncode == EXIT_INTERRUPTED
    assert leftovers(tmp_path) == []


def sleeping_in_c(pid: int, timeout: float = 30.0) -> None:
    """Until the process's main thread is inside a nanosleep/clock_nanosleep system call (/proc/PID/syscall); where
    that file cannot be read, a second's grace instead."""
    import platform
    if platform.machine() != "x86_64":  # (the numbers below are x86-64's)
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                if f.read().split()[0] in ("35", "230"):  # x86-64 nanosleep, clock_nanosleep
                    return
        except (OSError, IndexError):
            time.sleep(1.0)
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never went to sleep in C")


def ctrl_c_in_c(setup: str, guard: str) -> tuple[int, str, float]:
    """A child that runs `setup`, then under `guard` (a `with` expression) blocks SIGINT in its main thread and
    sleeps in libc, is sent Ctrl-C once it sleeps there. -> (exit code, stderr, seconds from the signal)."""
    code = setup + textwrap.dedent(f"""
        import ctypes, signal
        with {guard}:
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})
            print("ready", flush=True)
            ctypes.CDLL(None).sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # a signal sent between the print and the C call would be a Python KeyboardInterrupt (the watcher thread
        # takes it, the main thread runs its handler at the next bytecode): wait until the main thread sleeps in C
        sleeping_in_c(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, err, time.monotonic() - t0


def test_ctrl_c_during_one_long_op(tmp_path):
    """The main thread stuck in C code (here: deaf to SIGINT in a libc sleep) is ended by the watcher after the
    grace time, with the same line and code, and the temporaries being written are removed."""
    pending = tmp_path / ".out.png.tmp-1"
    setup = textwrap.dedent(f"""
        from ipadapter_instruct.engine import output
        from ipadapter_instruct.engine.__main__ import interrupt_guard
        open({str(pending)!r}, "w").close()
        output._pending.add({str(pending)!r})
    """)
    code, err, seconds = ctrl_c_in_c(setup, "interrupt_guard(grace_s=0.5)")
    assert code == EXIT_INTERRUPTED and err.strip() == INTERRUPTED
    assert seconds < 20 and not pending.exists()


PROBE = ("import runpy, sys\nsys.argv = ['engine', *sys.argv[1:]]\ntry:\n    runpy.run_module('engine', "
         "run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\nheavy = [m for m in ('torch', 'diffusers', "
         "'transformers', 'triton') if m in sys.modules]\nprint(code, heavy, file=sys.__stdout__)")


@pytest.mark.parametrize("args,code", [
    (["--help"], 0), (["generate", "--help"], 0), (["generate", "--model", "m", "--steps", "0", "--out", "x.png"], 2),
    (["generate", "--model", "MODEL", "--prompt", "p", "--height", "100000", "--out", "OUT"], 1),
    (["generate", "--model", "MODEL", "--prompt", "p", "--out", "/nonexistent/x.png"], 1)])
def test_answers_without_heavy_imports(tiny, tmp_path, args, code):
    args = [{"MODEL": tiny["model"], "OUT": str(tmp_path / "x.png")}.get(a, a) for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == f"{code} []", done.stdout + done.stderr


def test_lazy_kernel_names_resolve():
    from ipadapter_instruct import kernels
    lazy = [n for n in kernels.__all__ if n != "BACKENDS"]  # each public name loads its module on first use
    assert lazy and all(callable(getattr(kernels, n)) for n in lazy)


def test_make_tiny_writes_real_formats(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "w")]) == 0
    for rel in ("model/model_index.json", "model/unet/config.json", "model/tokenizer", "image_encoder/config.json",
                "image_encoder/preprocessor_config.json", "adapter.safetensors"):
        assert os.path.exists(tmp_path / "w" / rel), rel


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo" / "demo.png"
    assert main(["demo", "--cache", str(tmp_path / "cache"), "--out", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "warm-up" in text and "denoise_ms" in text and "RANDOM weights" in text
    assert out.exists() and (tmp_path / "demo" / "demo-condition.png").exists()
    assert main(["demo", "--model", "x"]) == 1  # real weights must come as a set


@pytest.mark.parametrize("build, argv, wrong", [
    ("ipadapter_instruct.engine.__main__:build_parser", ["generate", "--model", "m", "--out", "x.png", "--step", "2"], "--step"),
    ("ipadapter_instruct.export.__main__:_parser", ["onnx", "--model", "m", "--image-encoder", "e", "--adapter", "a", "--out", "o",
                                  "--ops", "17"], "--ops"),
    ("ipadapter_instruct.bench.__main__:build_parser", ["e2e", "--step", "2"], "--step"),
    ("ipadapter_instruct.train.__main__:train_parser", ["--model", "m", "--image-encoder", "e", "--data", "d", "--out", "o",
                                     "--step", "2"], "--step"),
])
def test_no_command_takes_an_abbreviated_flag(build, argv, wrong, capsys):
    """argparse's prefix matching would read `--step 2` as `--steps 2`: every command line refuses it, one line."""
    import importlib
    module, _, name = build.partition(":")
    parser = getattr(importlib.import_module(module), name)()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"unrecognized arguments: {wrong}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("build", ["ipadapter_instruct.engine.__main__:build_parser",
                                   "ipadapter_instruct.export.__main__:_parser",
                                   "ipadapter_instruct.bench.__main__:build_parser",
                                   "ipadapter_instruct.train.__main__:train_parser"])
def test_help_shows_each_default_once_and_no_empty_ones(build):
    import argparse
    import importlib
    import re
    module, _, name = build.partition(":")
    parsers = [getattr(importlib.import_module(module), name)()]
    for p in parsers:  # every subcommand's too
        parsers += [c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()]
    for p in parsers:
        text = re.sub(r"\s+", " ", p.format_help())
        assert "(default: None)" not in text and "(default: False)" not in text, p.prog
        for option in re.split(r" (?=--?[a-z])", text):
            assert option.count("(default:") <= 1, f"{p.prog}: {option}"
