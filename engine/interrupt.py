"""Ctrl-C in every command (python -m engine, export, train, bench): one line on stderr, exit 130, and nothing
half-written left behind. Light: no torch.

    return interruptible(lambda: work(args), "python -m export trt: interrupted (Ctrl-C): no plan written")

Ctrl-C raises KeyboardInterrupt at the next Python line; `interruptible` turns it into the one line and 130. Two
kinds of C code need more:
- one op that runs for minutes without returning to Python: a watcher thread, woken by the signal itself
  (signal.set_wakeup_fd), ends the process with the same line and code if the main thread has not left the guard
  `grace_s` seconds later, removing first the temporaries being written (engine.output's, and the files and
  folders registered with `remove_if_killed`);
- C++ that calls back into Python and swallows what its callbacks raise (TensorRT's builder logs a
  KeyboardInterrupt raised in its logger and builds on): inside `polled()`, Ctrl-C only sets `requested()`, which
  that code's callbacks poll to cancel (TensorRT's IProgressMonitor), and leaving the block raises
  KeyboardInterrupt when it was pressed.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager

from ipadapter_instruct.engine.output import discard_pending

INTERRUPTED = "interrupted (Ctrl-C): stopped, no output written"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
GRACE_S = 3.0  # after Ctrl-C, how long one long C call may keep the process before it is ended

_requested = threading.Event()  # Ctrl-C came (set by the watcher thread too: TensorRT calls back from its threads)
_paths: set[str] = set()  # files and folders being written, removed before a forced exit


def requested() -> bool:
    """Whether Ctrl-C came since the guard began."""
    return _requested.is_set()


def remove_if_killed(path: str) -> None:
    """`path` (a file or folder being written) goes if the watcher has to end the process, until forget(path); the
    caller removes it on other failures."""
    _paths.add(path)


def forget(path: str) -> None:
    _paths.discard(path)


def _forced_exit(message: str) -> None:
    discard_pending()
    for path in list(_paths):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    os.write(2, f"{message}\n".encode())
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def interrupt_guard(grace_s: float = GRACE_S, message: str = INTERRUPTED):
    """Ctrl-C raises KeyboardInterrupt in the main thread; if that thread has not left this block `grace_s` seconds
    later (stuck in one C call), the process ends with `message` and exit 130, its temporaries removed first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    left = threading.Event()
    _requested.clear()

    def watch():
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while data := pipe.read(64):
                if signal.SIGINT in data:
                    _requested.set()
                    if not left.wait(grace_s):
                        _forced_exit(message)

    # a shell starts background jobs with SIGINT ignored, and Python keeps that: take it back, so `kill -INT` works too
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="interrupt-guard", daemon=True).start()
    try:
        yield
    finally:
        left.set()
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGINT, handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns


@contextmanager
def polled():
    """Within: Ctrl-C sets requested() and raises nothing (the code inside polls it); leaving the block raises
    KeyboardInterrupt if it came. Outside the main thread it only yields."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()  # (a Ctrl-C before this line was a KeyboardInterrupt already)
    handler = signal.signal(signal.SIGINT, lambda signum, frame: _requested.set())
    try:
        yield
    except Exception:  # (what the cancelled code raised: a failed build, say)
        if _requested.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, handler)
    if _requested.is_set():
        raise KeyboardInterrupt


def interruptible(run, message: str = INTERRUPTED, grace_s: float = GRACE_S):
    """run() under the guard -> its result; on Ctrl-C, `message` on stderr and EXIT_INTERRUPTED."""
    try:
        with interrupt_guard(grace_s, message):
            return run()
    except KeyboardInterrupt:
        print(message, file=sys.stderr)
        return EXIT_INTERRUPTED
