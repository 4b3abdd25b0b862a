"""The GPU check (bench/gpu_session.sh) rehearsed on this machine, which has no GPU.

- Every test file that holds gpu tests is in bench/gpu-tests.txt, or deselected whole there with a reason: a new
  gpu test file cannot be left out of the check unseen.
- `bash bench/gpu_session.sh all` in an environment shaped like the GPU image: a venv holding only the image's
  packages (bench/gpu-image.txt), linked from this one, so no pydantic, FastAPI or diffusers, and the carried wheels
  installed by the script itself as on the GPU. Every part runs to its end and records its failure, the gpu-tests
  part collects every gpu test of its files without a collection error, each part keeps to its limit, and $OUT
  holds no more than a device call brings back (8 files, 2 folders down) and no more than the script promises.
  The whole suite, stopped at its limit, still leaves pytest's XML. About a minute on 2 cores.
"""
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

from ipadapter_instruct.bench import gpu_tests
from ipadapter_instruct.bench.envcheck import IMAGE, carried, normalize

ROOT = Path(__file__).resolve().parent.parent
# what the image lacks that this environment has and the check must not lean on: never linked, even where one of
# the image's packages requires it here (typer's version here needs pydantic; the image's does not bring it)
ABSENT = {"pydantic", "pydantic-core", "fastapi", "starlette", "uvicorn", "diffusers", "ray", "selenium",
          "onnxruntime-extensions", "tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu12-libs"}
NO_GPU = "which counts as a failure: Skipped: needs a CUDA GPU"  # conftest, under ENGINE_GPU_CHECK=1
GRACE = 15  # the script's seconds from a part's SIGINT to its SIGKILL
PART = re.compile(r"^== (?P<part>[\w-]+): rc (?P<rc>\d+)[^,]*, (?P<s>\d+) s \(limit (?P<limit>\d+) s\)$")


@pytest.fixture(scope="module")
def gpu_nodes() -> list[str]:
    """The node ids of every gpu test, collected here with every package the project uses."""
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-m", "gpu", "-q", "-p",
                          "no:cacheprovider", "tests"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if "::" in line]


def test_every_file_with_gpu_tests_is_listed_or_deselected_with_a_reason(gpu_nodes):
    plan = gpu_tests.read()
    holding = {n.split("::")[0] for n in gpu_nodes}
    whole = {node for node, _ in plan.deselected if "::" not in node}
    assert not holding - set(plan.files) - whole, \
        "these files hold gpu tests: add each to bench/gpu-tests.txt (or `deselect FILE REASON` there)"
    assert not set(plan.files) - holding, "bench/gpu-tests.txt lists files that hold no gpu test"
    assert not set(plan.files) & whole, "bench/gpu-tests.txt both lists and deselects these files"
    for node, why in plan.deselected:
        assert why and any(n.startswith(node) for n in gpu_nodes), f"deselect {node}: no gpu test starts so"
    assert plan.files[:4] == tuple(f"tests/test_kernels_{k}.py" for k in ("attention", "norms", "packed",
                                                                         "projector"))
    assert plan.files[-1] == "tests/test_compile.py"  # the inductor compiles last


def test_gpu_tests_list_refuses_a_line_it_cannot_read(tmp_path):
    (tmp_path / "list.txt").write_text("tests/test_a.py\ndeselect tests/test_b.py\n")
    with pytest.raises(ValueError, match=r"list.txt:2: want a test file alone or `deselect NODE REASON`"):
        gpu_tests.read(str(tmp_path / "list.txt"))


def carried_wheels(dest: Path) -> Path:
    """.whl/ when it holds exactly bench/gpu-requirements.txt's wheels, else `make gpu-wheels` into dest."""
    want = {name: line.split("==")[1] for name, line in carried().items()}
    folder = ROOT / ".whl"
    names = [f for f in os.listdir(folder) if f.endswith(".whl")] if folder.is_dir() else []
    if {str(n): str(v) for n, v, _, _ in map(parse_wheel_filename, names)} == want:
        return folder
    res = subprocess.run(["make", "-s", "gpu-wheels", f"GPU_WHEELS={dest}", f"PYTHON={sys.executable}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return dest


def installable_here(wheels: Path, dest: Path) -> Path:
    """The wheels as they are where this interpreter installs them (pure Python, as all are now); any other (a
    cp312 build: the image's Python is 3.12) as the same version built for this interpreter, said on a line."""
    here = set(sys_tags())
    dest.mkdir()
    for wheel in sorted(wheels.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if tags & here:
            shutil.copy(wheel, dest)
            continue
        print(f"rehearsal: {wheel.name} does not install here: {name}=={version} built for this Python instead")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                        str(dest), f"{name}=={version}"], check=True, timeout=300)
    return dest


def image_env(dest: Path) -> Path:
    """A venv of this Python whose site-packages links, from this environment, the image's packages and what
    their versions here require, less ABSENT and the carried ones. -> its python."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=120)
    python = dest / "bin" / "python"
    site = Path(sysconfig.get_path("purelib"))
    linked = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    dists = {normalize(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
    keep, todo, wheels = set(), [n for n in dists if n in IMAGE], carried()
    while todo:  # the image's packages and, as they are here, their requirements
        name = todo.pop()
        if name in keep or name in ABSENT or name in wheels:
            continue
        keep.add(name)
        reqs = map(Requirement, dists[name].requires or [])
        todo += [normalize(r.name) for r in reqs if normalize(r.name) in dists
                 and (r.marker is None or r.marker.evaluate({"extra": ""}))]
    print(f"rehearsal: linked beyond the image's list, as this environment's versions require: "
          f"{sorted(keep - IMAGE)}")

    def parts(names):
        return [f.parts for n in names for f in dists[n].files or [] if not f.parts[0] == ".."]
    shared = {p[:i] for p in parts(set(dists) - keep) for i in range(1, len(p) + 1)}
    links = set()
    for p in parts(keep):  # the shortest path no left-out package shares (a namespace such as google/ is split)
        links.add(next((p[:i] for i in range(1, len(p) + 1) if p[:i] not in shared), p))
    for p in sorted(links, key=len):
        if not any(p[:i] in links for i in range(1, len(p))):
            (linked / Path(*p)).parent.mkdir(parents=True, exist_ok=True)
            (linked / Path(*p)).symlink_to(site / Path(*p))
    return python


def junit_cases(path: Path) -> list[tuple[str, str, str]]:
    """(file, outcome tag or 'passed', message) per testcase of a JUnit XML."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = [(c.tag, (c.get("message") or "") + "\n" + (c.text or "")) for c in case
                if c.tag in ("error", "failure", "skipped")]
        tag, text = tags[0] if tags else ("passed", "")
        cases.append((case.get("classname", "").replace(".", "/") + ".py", tag, text))
    return cases


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """-> run(stage, **env): `bash bench/gpu_session.sh STAGE` in the image-shaped environment with the carried
    wheels (installed by the script into a site of its own, once), its own $OUT; -> (result, $OUT)."""
    t0, root = time.monotonic(), tmp_path_factory.mktemp("image")
    python = image_env(root / "venv")
    for module in ("pydantic", "fastapi", "diffusers", "ray", "selenium", "tensorrt_rtx_bindings"):
        res = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, timeout=120)
        assert res.returncode != 0, f"{module} is importable in the image-shaped environment"
    wheels = installable_here(carried_wheels(root / "whl-3.12"), root / "whl")
    print(f"rehearsal: the environment and the wheels in {time.monotonic() - t0:.0f} s")
    (root / "tmp").mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET",
                                                             "ENGINE_GPU_CHECK", "GPU_CHECK_SECONDS")}
    base.update(PYTHON=str(python), WHEELS=str(wheels), GPU_SESSION_SITE=str(root / "site"),
                BENCH_CACHE=str(root / "cache"), TMPDIR=str(root / "tmp"))

    def run(stage: str, **env) -> tuple[subprocess.CompletedProcess, Path]:
        out, t1 = root / f"out-{stage}", time.monotonic()
        res = subprocess.run(["bash", "bench/gpu_session.sh", stage], capture_output=True, text=True,
                             env={**base, "OUT": str(out), **env}, timeout=600, cwd=ROOT)
        print(f"rehearsal: `{stage}` in {time.monotonic() - t1:.0f} s")
        return res, out
    return run


def out_files(out: Path) -> tuple[list[Path], str, dict[str, str]]:
    """$OUT's files (relative), stages.txt, and the logs archive's files by name."""
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    return [p.relative_to(out) for p in out.rglob("*") if p.is_file()], (out / "stages.txt").read_text(), logs


def test_gpu_check_rehearsed_in_an_image_shaped_environment(gpu_nodes, image):
    res, out = image("all")
    said = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 1, said  # no GPU: the check fails, by its parts' failures
    files, stages, logs = out_files(out)

    # $OUT: what the script promises, within what a device call brings back
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    top = {f.name for f in files if len(f.parts) == 1}
    assert {"stages.txt", "gpu-tests.xml", "logs.tar.gz"} <= top <= \
        {"stages.txt", "gpu-tests.xml", "ops.json", "e2e-short.json", "logs.tar.gz"}, top

    # every part ran to its end within its limit, and said why it failed
    parts = {m["part"]: m for m in map(PART.match, stages.splitlines()) if m}
    assert list(parts) == ["envcheck", "gpu-tests", "ops", "e2e-short"], stages
    for m in parts.values():
        assert int(m["s"]) <= int(m["limit"]) + GRACE, f"{m['part']} overran its limit:\n{stages}"
    assert parts["gpu-tests"]["rc"] == "1", stages  # tests failed; 2-5 would be pytest interrupted or unable
    assert re.search(r"^== wheels: installed \d+ from ", stages, re.M), stages
    assert "== weights: not built: no CUDA GPU" in stages and "== trt: not run: " in stages, stages
    assert stages.splitlines()[-1].startswith("== verdict: FAILED (all, "), stages
    for part in ("ops", "e2e-short"):
        assert "--device cuda but no CUDA GPU is available" in logs[f"{part}.log"], logs[f"{part}.log"]
    for node, why in gpu_tests.read().deselected:
        assert f"gpu-tests: deselected {node}: {why}" in logs["gpu-tests.log"]

    # the gpu-tests part: no collection error, every gpu test of its files collected, each failing by the skip
    # that only a missing GPU may cause (ENGINE_GPU_CHECK=1)
    cases = junit_cases(out / "gpu-tests.xml")
    broken = [text for _, tag, text in cases if "collection failure" in text]
    assert not broken, "collecting the gpu tests failed in the image-shaped environment:\n" + "\n".join(broken)
    plan = gpu_tests.read()
    expected = sorted(n.split("::")[0] for n in gpu_nodes if plan.keeps(n))
    assert sorted(f for f, _, _ in cases) == expected, said
    other = [(f, tag, text) for f, tag, text in cases if tag != "error" or NO_GPU not in text]
    assert not other, other[:3]


def test_a_part_stopped_at_its_limit_leaves_pytests_xml_and_log(image):
    """SIGINT first: the whole suite (stage `tests`) cut off after a few seconds still writes its JUnit XML, says
    where it stopped, and its log reaches the archive; the stage's line says it timed out."""
    # a limit of about 20 s, over the in-process kernel tests: a test whose subprocess is still importing torch
    # when SIGINT comes can outlast the 15 s grace on a loaded machine (make test runs 2 workers)
    res, out = image("tests", GPU_CHECK_SECONDS="45", PYTEST_ADDOPTS="-k kernels")
    files, stages, logs = out_files(out)
    m = next(filter(None, map(PART.match, stages.splitlines())))
    assert m["part"] == "tests" and m["rc"] == "124" and "(timed out)" in stages, stages
    assert int(m["s"]) <= int(m["limit"]) + GRACE, stages
    assert "KeyboardInterrupt" in logs["tests.log"], logs["tests.log"][-3000:]
    assert next(ET.parse(out / "tests.xml").getroot().iter("testsuite"), None) is not None  # whole, and parses
    assert sorted(map(str, files)) == ["logs.tar.gz", "stages.txt", "tests.xml"]


def test_readme_and_script_header_give_the_scripts_plan():
    """The parts of `all` with their limits, the deadline and the device call's timeout, the files of $OUT and
    the deselected test files, as the script has them, in docs/gpu-check.md and the script's own header."""
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    readme = (ROOT / "docs" / "gpu-check.md").read_text()
    header = script.split("\nset -uo pipefail", 1)[0]
    plan = re.findall(r"^ +part ([\w-]+) (\d+)$", script, re.M)
    assert [name for name, _ in plan] == ["envcheck", "gpu-tests", "ops", "e2e-short", "trt"], plan
    deadline = re.search(r"deadline=\$\{GPU_CHECK_SECONDS:-(\d+)\}", script)[1]
    for text, where in ((readme, "docs/gpu-check.md"), (header, "the script's header")):
        for name, limit in plan:
            assert re.search(rf"`?{name}`?\s+\({limit} s", text), f"{where} does not give `{name}` ({limit} s"
        assert f"GPU_CHECK_SECONDS ({deadline})" in " ".join(text.split()) or \
            f"GPU_CHECK_SECONDS={deadline}" in text, f"{where}: the deadline {deadline}"
        assert 'run(carry=[".whl"], command="bash bench/gpu_session.sh all", timeout_s=430)' in text, where
    for name in ("stages.txt", "gpu-tests.xml", "ops.json", "e2e-short.json", "logs.tar.gz"):
        assert name in readme
    for node, _ in gpu_tests.read().deselected:
        assert node.removeprefix("tests/") in readme, f"docs/gpu-check.md does not say why {node} is deselected"
