"""Step functions of the CLI's acceptance tests, in a module that imports nothing but the
standard library: a step's process imports it, and whatever it imports could write to the
step's log."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path


def first() -> str:
    print("first step ran")  # noqa: T201 - the step's output is its log
    return "one"


def wait_for(gate: str) -> str:
    print("waiting for the gate", flush=True)  # noqa: T201 - the step's output is its log
    with open(gate) as fifo:  # blocks until the test opens the FIFO for writing
        fifo.read()
    print("gate open", flush=True)  # noqa: T201 - the step's output is its log
    return "done"


def hello(word: str) -> str:
    print(f"hello {word}")  # noqa: T201 - the step's output is its log
    return word


def prepare() -> int:
    """Prints what differs in every run: its pid and the time."""
    print(f"prepared by pid {os.getpid()} at {datetime.now(UTC).isoformat()}")  # noqa: T201 - the step's output is its log
    return 1


def check(flag: str) -> str:
    """Fails when the file ``flag`` exists."""
    print("checking")  # noqa: T201 - the step's output is its log
    if Path(flag).exists():
        raise RuntimeError(f"{flag} says fail")
    return "checked"
