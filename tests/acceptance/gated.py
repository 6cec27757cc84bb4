"""A run that lasts until the test lets it end: step ``wait`` blocks reading a FIFO that the
test writes to, step ``first`` ends at once (:mod:`tests.acceptance.steps`). Run as
``python -m tests.acceptance.gated STORE LOG_DIR FIFO``; prints the run id when it ends.

Shared by the tests of ``aeventor watch`` and ``aeventor logs -f``, with the helpers that
start it, find its run and open the gate (each waits with a deadline, never a sleep).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aeventor as evr
from aeventor import queries
from tests.acceptance.steps import first, wait_for
from tests.waiting import wait_until, within

ROOT = Path(__file__).resolve().parents[2]


def main(store: str, log_dir: str, gate: str) -> None:
    ev = evr.Eventor(name="gated", store=store, log_dir=log_dir)
    go = ev.add_event("go")
    ev.add_step("first", func=first)
    ev.add_step("wait", func=wait_for, args=(gate,))
    ev.add_assoc(go, "first", "wait")
    ev.trigger_event(go, 1)
    print(ev.run_sync().run_id)  # noqa: T201 - the test reads it


async def start(store: str, tmp_path: Path) -> tuple[asyncio.subprocess.Process, str, Path]:
    """Start a gated run; return its process, its run id (once step ``wait`` is waiting, as
    its log says) and the gate."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.acceptance.gated",
        store,
        str(tmp_path / "logs"),
        str(gate),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    found: list[str] = []

    async def waiting() -> bool:
        if not found:
            try:  # the run's process may still be creating the sqlite store
                listed = await evr.runs(store, program="gated") if await _exists(store) else []
            except evr.AeventorError:
                return False
            if not listed:
                return False
            found.append(listed[0].run_id)
        try:
            log = await queries.log_file(store, found[0], "wait")
        except evr.ConfigurationError:  # not made ready yet
            return False
        text = await asyncio.to_thread(_read, log.path)
        return "waiting for the gate" in text

    await wait_until(waiting, what="the gated run's step to wait at its gate")
    return proc, found[0], gate


async def _exists(store: str) -> bool:
    if "://" in store:
        return True
    return await asyncio.to_thread(Path(store).is_file)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def open_gate(gate: Path) -> None:
    """Let step ``wait`` end (it is reading the FIFO: opening it for writing does not block)."""

    def release() -> None:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"go\n")
        os.close(fd)

    await asyncio.to_thread(release)


async def end(proc: asyncio.subprocess.Process, gate: Path) -> tuple[int, str]:
    """Open the gate if nobody did (a test that failed early), and wait for the run to end;
    its exit code and output."""
    try:
        await open_gate(gate)
    except OSError:  # ENXIO: no reader any more, the gate was opened
        pass
    out, _ = await within(proc.communicate(), what="the gated run to end")
    assert proc.returncode is not None
    return proc.returncode, out.decode()


if __name__ == "__main__":
    main(*sys.argv[1:4])
