"""Module-level step functions for the SSH executor's tests (imported by path remotely).

They run in a step subprocess on the far side of sshd (on this machine), so they are plain
blocking code.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

#: Seconds the long-running processes sleep: far longer than any test.
LONG = 300


def where(marker: str) -> dict[str, object]:
    """Where the step ran, and the variables it was given; it writes to stdout and its log."""
    print(f"stdout says {marker}", flush=True)  # noqa: T201 - the step's log is its output
    logging.getLogger("sshfuncs").warning("logging says %s", marker)
    return {
        "hostname": socket.gethostname(),
        "ssh_connection": os.environ.get("SSH_CONNECTION"),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("EVENTOR_", "AEVENTOR_"))},
    }


def spawn_and_sleep(marker: str, report: str) -> None:
    """Start a child and a grandchild that sleep (``marker`` in their argv), then sleep.

    Writes ``{"pid": ..., "children": [...]}`` to ``report`` once both run.
    """
    grandchild = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({LONG})', "
        "sys.argv[1]]); "
        f"time.sleep({LONG})"
    )
    child = subprocess.Popen([sys.executable, "-c", grandchild, marker])
    sleeper = subprocess.Popen(["sh", "-c", f"sleep {LONG}; : {marker}"])
    tmp = Path(report + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "children": [child.pid, sleeper.pid]}))
    tmp.rename(report)
    child.wait()


def environment() -> dict[str, str]:
    """The step's whole environment."""
    return dict(os.environ)


def fire(event: str, *sequences: str) -> dict[str, object]:
    """Fire ``event`` through the step's channel: for the step's own sequence, then for each
    of ``sequences``; return where it ran and the channel it used (raises what ``trigger``
    raises: the step fails with the worker's message)."""
    import aeventor as evr

    step = evr.current_step()
    step.trigger(event)
    for sequence in sequences:
        step.trigger(event, sequence=sequence)
    return {
        "ssh_connection": os.environ.get("SSH_CONNECTION"),
        "channel": os.environ.get("EVENTOR_CHANNEL_PATH"),
        "step": step.step,
        "run_id": step.run_id,
    }


def no_channel() -> str:
    """What ``current_step()`` says to a step that was given no channel."""
    import aeventor as evr

    try:
        evr.current_step()
    except evr.AeventorError as exc:
        return str(exc)
    return "current_step() worked"
