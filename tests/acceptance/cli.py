"""Running the installed ``aeventor`` console script from the CLI's tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.waiting import within

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "AEVENTOR_STORE"}


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``aeventor ARGV`` to its end (stdout is a pipe: plain output)."""
    return subprocess.run(
        [AEVENTOR, *argv], capture_output=True, text=True, timeout=60, check=False, env=_env()
    )


async def start(*argv: str) -> asyncio.subprocess.Process:
    """Start ``aeventor ARGV`` with its stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        AEVENTOR, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )


async def first_line(proc: asyncio.subprocess.Process, what: str) -> str:
    assert proc.stdout is not None
    line: bytes = await within(proc.stdout.readline(), what=what)
    return line.decode()


async def finish(proc: asyncio.subprocess.Process, what: str) -> tuple[int, str, str]:
    """Wait for the process to end; its exit code, and the rest of its stdout and stderr."""
    out, err = await within(proc.communicate(), what=what)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
