"""Step functions and programs of the distributed acceptance tests.

The agents import the step functions by module name (``tests.acceptance.*`` is allowed) or,
when ``aeventor submit`` loads this file as a script, by path. The steps run in subprocesses
of the agents (or on the far side of sshd), so they are plain blocking code. This module
imports nothing from ``tests`` so that it also loads by path.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import aeventor as evr

#: Seconds the long-running steps sleep: far longer than any test.
LONG = 300
#: Names of the environment variables a step reports.
REPORTED_ENV = ("EVENTOR_HOST", "EVENTOR_STEP_SEQUENCE", "SSH_CONNECTION", "GROUP_VAR", "OWN_VAR")


def where(progname: str) -> dict[str, Any]:
    """Where the step ran: its host assignment, sequence, SSH connection and process."""
    return {
        "prog": progname,
        "host": os.environ.get("EVENTOR_HOST"),
        "sequence": os.environ.get("EVENTOR_STEP_SEQUENCE"),
        "ssh_connection": os.environ.get("SSH_CONNECTION"),
        "pid": os.getpid(),
        "env": {name: os.environ.get(name) for name in REPORTED_ENV},
    }


def write_marker(path: str, text: str) -> str:
    """Write ``text`` to ``path``: the proof that the step ran (with these arguments)."""
    Path(path).write_text(text)
    return text


def mark(directory: str, sequence: str) -> str:
    """Create ``directory/sequence`` (the sequence is passed by ``sequence_arg_name``)."""
    path = Path(directory) / sequence
    path.write_text(os.environ.get("EVENTOR_HOST", ""))
    return str(path)


def sleep_long(report: str) -> None:
    """Start a sleeping child, write ``{"pid", "child"}`` to ``report``, then sleep."""
    child = subprocess.Popen(["sleep", str(LONG)])
    tmp = Path(report + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "child": child.pid}))
    tmp.rename(report)
    time.sleep(LONG)


def sleep_once(report: str) -> str:
    """The first time: as :func:`sleep_long`; once ``report`` exists: return at once."""
    if Path(report).exists():
        return "again"
    sleep_long(report)
    return "slept"


def example(
    *,
    store: str | None = None,
    name: str = "dist_notes",
    cluster_key: str | None = None,
    func: Any = where,
) -> evr.Eventor:
    """The design notes' example program, in distributed mode, triggered for sequence 1."""
    ev = evr.Eventor(name=name, store=store, mode="distributed", cluster_key=cluster_key)
    ev1s = ev.add_event("run_step1")
    ev2s = ev.add_event("run_step2")
    ev3s = ev.add_event("run_step3")
    s11 = ev.add_step(
        "s11",
        host="s1",
        func=func,
        kwargs={"progname": "prog11"},
        triggers={evr.StepStatus.success: (ev2s,)},
    )
    s12 = ev.add_step(
        "s12",
        host="s2",
        func=func,
        kwargs={"progname": "prog12"},
        triggers={evr.StepStatus.success: (ev2s,)},
    )
    s2 = ev.add_step(
        "s2",
        host="s2",
        func=func,
        kwargs={"progname": "prog2"},
        triggers={evr.StepStatus.success: (ev3s,)},
    )
    s3 = ev.add_step("s3", host="s1", func=func, kwargs={"progname": "prog3"})
    ev.add_assoc(ev1s, s11)
    ev.add_assoc(ev1s, s12)
    ev.add_assoc(ev2s, s2)
    ev.add_assoc(ev3s, s3)
    ev.trigger_event(ev1s, 1)
    return ev


def build() -> evr.Eventor:
    """For ``aeventor submit distprog.py:build --store URL``."""
    return example()


def tally(directory: str, sequence: str) -> int:
    """Append a line to ``directory/<sequence>.tally`` each time it runs (its attempt and
    pid); return how many lines it has: the proof of how often the step ran."""
    path = Path(directory) / f"{sequence}.tally"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"attempt={os.environ.get('EVENTOR_STEP_ATTEMPT')} pid={os.getpid()}\n")
    return len(path.read_text(encoding="utf-8").splitlines())


def environment() -> dict[str, str]:
    """The step's whole environment."""
    return dict(os.environ)
