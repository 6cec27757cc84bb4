"""An agent frozen between its claim's commit and the step's start: the claim is requeued.

The proxy holds the acknowledgement of agent A's claim (the claim is committed), A is frozen
(SIGSTOP), and the acknowledgement is released into its socket. A second agent B (direct to
the database) serves the same host: once A's lease lapses, B's reaper must give the step run
back to the queue (status ``ready`` again: it never started, so it is not lost) and B runs
it. When A resumes and reads its claim's acknowledgement, its lease is gone: it must not run
the step. The step runs exactly once, and the run succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import aeventor as evr
from tests.acceptance.agents import CLUSTER_KEY, Agents, agent_rows, wait_until

from . import sql
from .checks import (
    S,
    assert_exactly_once,
    assert_nothing_active,
    chain,
    describe,
    executions,
    finish,
)
from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(90)

LEASE = 3.0
RUN_DEADLINE = 30.0

Proxies = Callable[[str], Awaitable[tuple[FaultProxy, str]]]


async def test_claim_of_a_frozen_agent_is_requeued(
    server_store: str, proxies: Proxies, agents: Agents, tmp_path: Path
) -> None:
    store = server_store
    proxy, via_proxy = await proxies(store)
    journal = tmp_path / "journal"
    timing = ["--lease", str(LEASE), "--heartbeat", "0.5"]
    frozen = await agents.start(via_proxy, "h1", allow=["tests.faults.*"], args=timing)
    held = proxy.cut_after_commit(sql.CLAIM, hold=True)
    ev = chain(
        store,
        journal,
        length=1,
        name="requeue",
        log_dir=tmp_path / "logs",
        host="h1",
        mode="distributed",
        cluster_key=CLUSTER_KEY,
    )
    resumed: datetime | None = None
    try:
        async with ev:
            handle = ev.start()
            await wait_until(held.committed.is_set, what="A's claim to commit")
            frozen.proc.send_signal(signal.SIGSTOP)
            held.release()  # into the frozen agent's socket
            live = await agents.start(store, "h1", allow=["tests.faults.*"], args=timing)
            result = await finish(
                handle, store=store, fault="agent A frozen after its claim", deadline=RUN_DEADLINE
            )
            frozen.proc.send_signal(signal.SIGCONT)
            resumed = datetime.now(UTC)

            # A is back once it has beaten twice since (it read its claim's ack by then).
            async def beat_since_resumed() -> bool:
                rows = await agent_rows(store)
                return any(
                    r.pid == frozen.pid and r.heartbeat >= resumed + timedelta(seconds=1)
                    for r in rows
                )

            await wait_until(beat_since_resumed, what="the resumed agent A to beat again")
    finally:
        if resumed is None:
            with contextlib.suppress(ProcessLookupError):
                frozen.proc.send_signal(signal.SIGCONT)

    assert result.status is evr.RunStatus.success, describe(result)
    (step,) = result.steps
    assert step.status is S.success, describe(result)
    assert live.ran(step.worker), f"run by {step.worker}, not by the live agent {live.pid}"
    await assert_exactly_once(journal, ["s0"])
    assert (await executions(journal))["s0"] == 1
    await assert_nothing_active(store)
    assert frozen.proc.returncode is None, await asyncio.to_thread(frozen.log)
