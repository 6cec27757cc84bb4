"""Step functions of the warm pool's tests (imported by path, in a zygote or a fresh runner).

Importing this module prints a line (the step's log gets it, once per process that imports
it), refuses to be imported where ``WARMFUNCS_REFUSE`` is set, sleeps ``WARMFUNCS_HANG`` seconds
where it is set, and starts a thread where ``WARMFUNCS_THREAD`` is set: the zygote imports it with the step's environment.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .stepfuncs import DEADLINE

print(f"warmfuncs imported in {os.getpid()}", flush=True)  # noqa: T201 - the step's log
if os.environ.get("WARMFUNCS_REFUSE"):
    raise RuntimeError("warmfuncs refuses to be imported here")
if os.environ.get("WARMFUNCS_HANG"):
    time.sleep(float(os.environ["WARMFUNCS_HANG"]))
if os.environ.get("WARMFUNCS_THREAD"):
    threading.Thread(target=time.sleep, args=(300,), daemon=True, name="warmfuncs").start()


def whoami() -> dict[str, object]:
    """Who runs this step: its pid, its parent, its session, its argv."""
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "argv": list(sys.argv),
        "threads": threading.active_count(),
    }


def set_env(key: str, value: str) -> dict[str, object]:
    """Change this process's environment (which must reach no other step)."""
    os.environ[key] = value
    return whoami()


def environ() -> dict[str, str]:
    return dict(os.environ)


def exit_with(code: int) -> None:
    sys.stdout.flush()
    os._exit(code)


def segfault(how: str) -> None:
    if how == "ctypes":
        ctypes.string_at(0)
    os.kill(os.getpid(), signal.SIGSEGV)


def report_and_wait(report: str, release: str) -> str:
    """Write ``{pid} {ppid}`` to ``report``, then return once ``release`` exists."""
    tmp = f"{report}.tmp"
    Path(tmp).write_text(f"{os.getpid()} {os.getppid()}")
    os.replace(tmp, report)
    deadline = time.monotonic() + DEADLINE
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} did not appear within {DEADLINE} s")
        time.sleep(0.01)
    return "released"


def touch(path: str) -> int:
    """Write this process's pid to ``path`` (that the step ran at all); return it."""
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


def sized(n: int) -> str:
    """A result of about ``n`` bytes once encoded (not all ASCII)."""
    return ("é" * n)[: n // 6]
