"""The reaper of the local Ray instance that `serve --ray` starts: a small process that outlives the driver.

The driver starts Ray with a temp dir of its own and puts `MARKER=<that dir>` in its environment, so every Ray
process (gcs_server, raylet, agents, workers) inherits it; Ray renames its agents and workers (setproctitle), which
can blank their command line and environment in /proc, but each keeps its log files open under the temp dir. The
reaper holds the read end of a pipe whose write end only the driver holds: EOF means the driver is gone or done,
however it ended (SIGTERM, SIGKILL, a crash). It then kills every process that carries the marker, names the dir
on its command line or has a file open under it, and removes the dir with the session folder in it. Nothing else:
a cluster joined through RAY_ADDRESS never gets a reaper, and other Ray instances on the machine have their own
temp dirs.

The driver side is `Reaper.start(temp_dir)`; the reaper side runs this file as a script (stdlib and psutil only,
so the engine package is not imported again in a process whose only work is to wait).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

MARKER = "ENGINE_RAY_INSTANCE"
SWEEP_S = 10.0   # a raylet killed mid-spawn can leave a worker starting: sweep until none is seen, this long at most
CLOSE_S = 30.0   # the driver waits this long for the reaper on a clean exit


class Reaper:
    """The driver's handle: the reaper process and the pipe it watches."""

    def __init__(self, proc: subprocess.Popen, temp_dir: str):
        self.proc, self.temp_dir = proc, temp_dir

    @classmethod
    def start(cls, temp_dir: str) -> "Reaper":
        """Starts the reaper for `temp_dir` (before Ray, so nothing of Ray's is left unwatched)."""
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        # -I: this folder's modules never shadow the reaper's imports; a new session: Ctrl-C to the terminal's
        # process group is not for it
        proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), temp_dir], stdin=subprocess.PIPE,
                                env=env, start_new_session=True)
        return cls(proc, temp_dir)

    def close(self) -> None:
        """EOF to the reaper, then wait while it kills what is left and removes the temp dir."""
        try:
            self.proc.stdin.close()
            self.proc.wait(CLOSE_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"warning: the Ray reaper did not finish ({e}); {self.temp_dir} may be left", file=sys.stderr)


def belongs(p, temp_dir: str) -> bool:
    """Whether process `p` is of the instance in temp_dir: the marker in its environment, the dir on its command
    line, or a file under it open (its logs). Ray's renamed processes (setproctitle) lose the first two."""
    inside = temp_dir.rstrip(os.sep) + os.sep
    try:
        return (p.environ().get(MARKER) == temp_dir or any(inside in a for a in p.cmdline())
                or any(f.path.startswith(inside) for f in p.open_files()))
    except psutil.Error:  # gone, a zombie, or another user's
        return False


def marked(temp_dir: str, spare: set[int]) -> list:
    """The live processes of the instance in temp_dir, `spare` aside."""
    return [p for p in psutil.process_iter() if p.pid not in spare and belongs(p, temp_dir)]


def reap(temp_dir: str, spare: set[int]) -> int:
    """Kills the marked processes until none is seen (SWEEP_S at most), removes temp_dir; returns how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + SWEEP_S
    while time.monotonic() < deadline:
        found = marked(temp_dir, spare)
        if not found:
            break
        for p in found:
            try:
                p.kill()  # the driver is gone: nothing of its instance has work worth a graceful end
                killed.add(p.pid)
            except psutil.Error:
                pass
        time.sleep(0.2)  # SIGKILL lands at once; a zombie (its parent not reaping yet) no longer counts
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(killed)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isabs(argv[0]):
        print("usage: ray_reaper.py TEMP_DIR (absolute; the driver starts this)", file=sys.stderr)
        return 2
    temp_dir = argv[0]
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only EOF ends the wait
        signal.signal(s, signal.SIG_IGN)
    spare = {os.getpid(), os.getppid()}  # the driver, when it is still there on a clean exit
    while sys.stdin.buffer.read(65536):
        pass
    killed = reap(temp_dir, spare)
    if killed:
        try:
            print(f"ray reaper: killed {killed} leftover Ray process{'es' if killed != 1 else ''} and removed "
                  f"{temp_dir}", file=sys.stderr, flush=True)
        except OSError:  # the driver's stderr went with it
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
