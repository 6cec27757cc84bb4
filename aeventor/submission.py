"""Submitting a program to the host agents, and following a run from anywhere.

Submission registers the program (signed with the cluster key), creates the run (signed too)
and fires its initial events (each step run it makes ready carries its MAC), in two
transactions; the submitter may then exit: the agents
carry the run to its end. Following a run reads its status whenever the store says it changed
(NOTIFY on Postgres) or the poll interval passes.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Sequence

from . import signing as _signing
from .dispatch import Graph
from .dispatch.store import Store
from .program.hosts import resolve_hosts  # re-exported: it used to live here
from .program.model import ProgramDef, RunStatus
from .records import RunResult

__all__ = ("follow", "resolve_hosts", "submit")

#: Longest wait between two looks at a followed run, whatever the store.
FOLLOW_POLL = 1.0


async def submit(
    db: Store,
    program: ProgramDef,
    triggers: Sequence[tuple[str, str]],
    *,
    key: bytes,
    run_id: str | None = None,
) -> str:
    """Register ``program``, start a run of it for the agents, fire ``triggers``; return the id."""
    run_id = run_id or uuid.uuid4().hex
    program_id = await db.register_program(
        program, signature=_signing.program_signature(key, program)
    )
    await db.create_run(
        # Signs the step runs the initial events make ready: agents run no unsigned row.
        Graph(program, signer=_signing.step_run_signer(key)),
        program_id=program_id,
        triggers=list(triggers),
        run_id=run_id,
        mode="distributed",
        submitted_by=socket.gethostname(),
        signature=_signing.run_signature(
            key, run_id=run_id, program_id=program_id, version=program.version
        ),
    )
    return run_id


async def follow(db: Store, run_id: str) -> RunResult:
    """Wait until the run ends (whoever drives it) and return its result."""
    poll = min(db.poll_interval or FOLLOW_POLL, FOLLOW_POLL)
    with db.notifier.subscribe(run_id) as changed:
        while True:
            changed.clear()
            if await db.run_status(run_id) is not RunStatus.running:
                return await db.load_result(run_id)
            try:
                async with asyncio.timeout(poll):
                    await changed.wait()
            except TimeoutError:
                pass
