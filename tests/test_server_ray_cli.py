"""`python -m engine serve --ray` as a process: on a loopback --host every socket of the local Ray instance it
starts listens on loopback only, and the driver's exit, by SIGTERM or by SIGKILL, leaves no process of that
instance and no session folder behind. One Ray start per signal (about 10-40 s each here). The reaper alone, on
stand-in processes, needs no Ray."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from server_utils import ServerProcess, tiny_args

from ipadapter_instruct.engine.server.ray_reaper import MARKER, Reaper

READY_TIMEOUT_S = 120
GONE_TIMEOUT_S = 30  # the driver's SIGKILL is seen by the reaper at once; killing and removing takes a second
LOOPBACK = ("127.", "::1", "::ffff:127.")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


def start(tiny) -> tuple[ServerProcess, list[psutil.Process]]:
    """The CLI on 127.0.0.1, ready; with every process it started (Ray's and any helper of ours)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI"):  # `make test` installs ray[serve] through the dev extra: missing is a failure
            pytest.fail(f"ray[serve] is not installed ({e}); the dev extra should install it")
        pytest.skip(f"ray[serve] is not installed ({e}): pip install 'ray[serve]'")
    srv = ServerProcess([*tiny_args(tiny), "--ray", "--device", "cpu", "--no-warmup"], timeout=READY_TIMEOUT_S)
    return srv, psutil.Process(srv.proc.pid).children(recursive=True)


def session_dirs(procs: list[psutil.Process]) -> set[str]:
    """The session folders (and a temp dir other than Ray's default) named on the Ray processes' command lines."""
    found = set()
    for p in procs:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        found.update(re.findall(r"--session[-_]dir=(\S+)", line))
        found.update(d for d in re.findall(r"--temp[-_]dir=(\S+)", line) if d.rstrip("/") != "/tmp/ray")
    return found


def alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def wait_gone(procs: list[psutil.Process], dirs: set[str], timeout: float) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        left, kept = alive(procs), sorted(d for d in dirs if os.path.exists(d))
        if not (left or kept) or time.monotonic() > deadline:
            return left, kept
        time.sleep(0.2)


def listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket and bound UDP socket of `procs`."""
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and c.laddr):
                    out.append((f"{p.pid} {p.name()}", c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return out


def test_ray_sigterm_loopback_only_and_nothing_left(tiny):
    srv, procs = start(tiny)  # a replica answers /ready once Serve started its servers too
    with srv:
        assert f"ready: {srv.url} (text-to-image, Ray Serve, 1 replica;" in srv.output()  # names the task
        sockets = listening([psutil.Process(srv.proc.pid), *procs])
        assert sockets, "no listening socket found: the test cannot see Ray's processes"
        assert [s for s in sockets if not s[1].startswith(LOOPBACK)] == [], srv.output()
        dirs = session_dirs(procs)
        assert dirs, "no --session-dir on a Ray process's command line"
        assert srv.terminate(timeout=60) == 0, srv.output()
    left, kept = wait_gone(procs, dirs, GONE_TIMEOUT_S)
    assert (left, kept) == ([], []), srv.output()


def test_ray_sigkill_leaves_nothing(tiny):
    srv, procs = start(tiny)
    with srv:
        dirs = session_dirs(procs)
        assert dirs, "no --session-dir on a Ray process's command line"
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        left, kept = wait_gone(procs, dirs, GONE_TIMEOUT_S)
    assert (left, kept) == ([], []), srv.output()


def sleeper(code: str = "", env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time\n{code}\ntime.sleep(60)"], env=env)


def test_reaper_kills_what_holds_its_dir_and_spares_the_rest():
    temp_dir = tempfile.mkdtemp(prefix="ray-engine-test-")
    log = os.path.join(temp_dir, "session_x", "logs", "agent.log")
    os.makedirs(os.path.dirname(log))
    # like Ray's renamed agents: neither the marker nor the dir on its command line, only its log open
    holder = sleeper("import os\nf = open(os.environ['LOG'], 'a')", env={**os.environ, "LOG": log})
    carrier = sleeper(env={**os.environ, MARKER: temp_dir})
    other = sleeper()
    try:
        reaper = Reaper.start(temp_dir)
        deadline = time.monotonic() + 20
        while not any(f.path == log for f in psutil.Process(holder.pid).open_files()):
            assert time.monotonic() < deadline and holder.poll() is None, "the stand-in never opened its log"
            time.sleep(0.05)
        reaper.close()
        assert reaper.proc.returncode == 0
        assert holder.wait(5) == -signal.SIGKILL and carrier.wait(5) == -signal.SIGKILL
        assert other.poll() is None and not os.path.exists(temp_dir)
    finally:
        for p in (holder, carrier, other):
            p.kill()
            p.wait()
