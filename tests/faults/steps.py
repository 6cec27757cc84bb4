"""Step functions of the fault tests: each execution appends one line to a file.

The agents import them by module name (``tests.faults.*`` is allowed); standalone runs
import them in their step processes. Every execution of a step appends ``<name>\\n`` to
``journal`` (``O_APPEND``: one short write is atomic, whichever process makes it), so
:func:`executions` counts how many times each step ran, whoever ran it. Plain blocking
code: it runs in step processes. This module imports nothing from ``tests``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

#: Seconds the long step sleeps: longer than any test.
LONG = 300


def record(journal: str, name: str) -> str:
    """Append ``name`` to ``journal``: one line per execution."""
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name}\n".encode())
    finally:
        os.close(fd)
    return name


def record_then_sleep(journal: str, name: str, report: str) -> None:
    """Record, start a sleeping child, write ``{"pid", "child"}`` to ``report``, sleep long."""
    record(journal, name)
    child = subprocess.Popen(["sleep", str(LONG)])
    tmp = Path(report + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "child": child.pid}))
    tmp.rename(report)
    time.sleep(LONG)


def executions(journal: Path) -> Counter[str]:
    """How many times each step ran (read this off the event loop: it reads a file)."""
    try:
        text = journal.read_text()
    except FileNotFoundError:
        return Counter()
    return Counter(text.split())
