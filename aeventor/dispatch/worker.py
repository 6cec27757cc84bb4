"""The loop that drives a run: claim ready step runs, execute them, record their outcome.

One :class:`asyncio.TaskGroup` owns every step task; cancelling the loop cancels them, which
terminates their processes, and the group waits until they are gone. The loop never sleeps on
a fixed interval: it wakes when a step of its own ends (each transaction says how many step
runs it made ready), when another process NOTIFYs, or when the store's poll interval passes
for stores that cannot push wake-ups.
"""

from __future__ import annotations

import asyncio
import os
import socket
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..backends.executors.local import ExecResult, LocalExecutor, StepLaunch
from ..backends.stores.base import Advance, Claim, Database, Taker
from ..context import StepContext, launch_env
from ..exceptions import ExecutorError
from ..logs import get_logger
from ..program.model import RunStatus, StepStatus
from ..utils import wait_any
from ._state import Graph
from .logs import RunLog, step_log_path

__all__ = ("RunDispatcher",)

log = get_logger("aeventor.dispatch")

#: Claim batch size when concurrency is unlimited.
_UNLIMITED = 64
#: Seconds between looks at a run when none of its steps runs here.
IDLE_POLL = 1.0


def worker_id() -> str:
    """Who claims: host name and pid (unique among live processes of a cluster)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RunDispatcher:
    """Drives one run in this process until it ends.

    Args:
        max_concurrency: most step runs executing at once (None: no limit).
        on_status: called whenever the run's status is known to change.
    """

    def __init__(
        self,
        *,
        db: Database,
        graph: Graph,
        run_id: str,
        executor: LocalExecutor,
        funcs: Mapping[str, Callable[..., Any]],
        run_dir: Path,
        run_log: RunLog,
        deterministic_logs: bool,
        logger_name: str,
        max_concurrency: int | None = None,
        on_status: Callable[[RunStatus], None] | None = None,
    ) -> None:
        self.db = db
        self.graph = graph
        self.run_id = run_id
        self.executor = executor
        self.funcs = funcs
        self.run_dir = run_dir
        self.run_log = run_log
        self.deterministic_logs = deterministic_logs
        self.logger_name = logger_name
        self.max_concurrency = max_concurrency
        self.on_status = on_status
        self.worker = worker_id()
        self.status = RunStatus.running
        self._running: set[int] = set()
        self._maybe_work = True
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._pending_claims: list[Claim] = []

    def taker(self, *, freeing: int = 0) -> Taker:
        """Lets a transaction claim the step runs it makes ready, up to our free capacity.

        Args:
            freeing: slots the caller is about to free (a completing step frees its own).
        """
        free = (
            _UNLIMITED
            if self.max_concurrency is None
            else self.max_concurrency - len(self._running) + freeing
        )
        return Taker(worker=self.worker, budget=max(free, 0))

    def apply(self, advance: Advance) -> None:
        """Take in what a transaction changed, and start the step runs it claimed for us."""
        for claim in advance.claims:
            self._start(claim)
        if advance.ready:
            self._maybe_work = True
        if advance.run_status is not self.status:
            self.status = advance.run_status
            if self.on_status is not None:
                self.on_status(self.status)
        self._wake.set()

    async def trigger(self, event: str, sequence: str) -> None:
        """Fire an event into the live run (from a handle or an in-loop step)."""
        self.run_log.info(f"event {event}[{sequence}] triggered")
        self.apply(
            await self.db.trigger(
                self.graph, run_id=self.run_id, event=event, sequence=sequence, take=self.taker()
            )
        )

    async def run(self) -> RunStatus:
        """Drive the run to its end and return its final status."""
        with self.db.notifier.subscribe(self.run_id) as remote:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for claim in self._pending_claims:
                    self._start(claim)
                self._pending_claims.clear()
                while self.status is RunStatus.running:
                    await self._claim_into(tg)
                    if self.status is not RunStatus.running:
                        break
                    await self._wait(remote)
        await self.run_log.flush()
        return self.status

    async def _claim_into(self, tg: asyncio.TaskGroup) -> None:
        if not self._maybe_work and self._running:
            return
        free = (
            _UNLIMITED
            if self.max_concurrency is None
            else self.max_concurrency - len(self._running)
        )
        if free <= 0:
            return
        self._maybe_work = False
        claims = await self.db.claim(worker=self.worker, limit=free, run_id=self.run_id)
        if len(claims) == free:
            self._maybe_work = True
        for claim in claims:
            self._start(claim)
        if not claims and not self._running:
            # Nothing runs and nothing is ready: the run ended in a transaction we did not
            # see (cancelled, or advanced by another process). Read it back.
            self.apply(Advance(0, await self.db.run_status(self.run_id)))

    def _start(self, claim: Claim) -> None:
        self._running.add(claim.id)
        if self._tg is None:
            # Claimed before the loop started (by the run's first transaction).
            self._pending_claims.append(claim)
            return
        self._tg.create_task(self._execute(claim), name=f"aeventor step {claim.step}")

    async def _wait(self, remote: asyncio.Event) -> None:
        if self._maybe_work and (
            self.max_concurrency is None or len(self._running) < self.max_concurrency
        ):
            return
        poll = self.db.poll_interval
        if not self._running:
            # Nothing of ours runs, yet the run goes on: only another process (or a change
            # we were not told of) can move it. Never wait for that unboundedly.
            poll = min(poll or IDLE_POLL, IDLE_POLL)
        await wait_any(self._wake, remote, poll=poll)
        if remote.is_set() or not self._wake.is_set():
            # Woken by another process, or the poll interval passed: look for work.
            self._maybe_work = True
        remote.clear()
        self._wake.clear()

    async def _execute(self, claim: Claim) -> None:
        step = self.graph.program.steps[claim.step]
        label = f"{claim.step}[{claim.sequence}]"
        try:
            env = launch_env(
                claim, step, program=self.graph.program.name, logger_name=self.logger_name
            )

            async def on_started(pid: int) -> None:
                self.run_log.info(
                    f"step {label} started" + ("" if self.deterministic_logs else f" pid={pid}")
                )
                self.apply(await self.db.started(self.graph, claim, pid=pid))

            context = None
            if step.executor == "inloop":
                context = StepContext(
                    run_id=self.run_id,
                    program=self.graph.program.name,
                    step=claim.step,
                    sequence=claim.sequence,
                    recovery=claim.recovery,
                    attempt=claim.attempt,
                    env=env,
                    _trigger=self.trigger,
                )
            spawns = step.executor in ("process", "command") and (
                step.target is not None or step.argv is not None
            )
            if not spawns:
                self.run_log.info(f"step {label} started")
                self.apply(await self.db.started(self.graph, claim))
            launch = StepLaunch(
                claim=claim,
                step=step,
                program=self.graph.program.name,
                env=env,
                log_path=step_log_path(self.run_dir, claim.step, claim.sequence, claim.attempt),
                deterministic_logs=self.deterministic_logs,
                on_started=on_started,
                func=self.funcs.get(claim.step),
                context=context,
            )
            try:
                result = await self.executor.run(launch)
            except ExecutorError as exc:
                result = ExecResult(ok=False, error="".join(traceback.format_exception(exc)))
            status = StepStatus.success if result.ok else StepStatus.failure
            advance = await self.db.complete(
                self.graph,
                claim,
                status=status,
                result=result.value,
                error=result.error,
                take=self.taker(freeing=1),
            )
            if result.ok:
                self.run_log.info(f"step {label} success")
            else:
                first = (result.error or "").strip().splitlines()[-1:] or [""]
                self.run_log.error(f"step {label} failure: {first[0]}")
            self.apply(advance)
            await self.run_log.flush()
        finally:
            self._running.discard(claim.id)
            self._wake.set()
