"""The per-host agent: ``python -m aeventor.agent`` (also ``aeventor agent``).

An agent serves one or more host names on one or more stores. For each store it runs one
:class:`asyncio.TaskGroup` that owns the claim loop, the heartbeat and the lease reaper; a
child that crashes stops the agent (nothing dies silently). It claims step runs queued for its
hosts (woken by LISTEN/NOTIFY on Postgres, by polling on MySQL), checks where each came from
(signed program and run, allowed module), runs it as a subprocess (locally, or over SSH for
hosts configured as SSH targets), and records the outcome together with everything it causes
in one transaction. Before it runs a step run it verifies the row's MAC (made with the cluster
key by whoever created it): rows inserted, copied or re-routed in the database are refused.
Its steps inherit only an allow-list of its environment variables (see :mod:`aeventor.context`):
never the cluster key nor the store's URL.

Heartbeats are one batched update per agent (its row and the leases of all its step runs). A
step run whose lease lapses (its agent died) is recorded as a failure by any agent's reaper,
and its failure triggers fire. On SIGTERM or SIGINT the agent stops claiming, lets running
steps finish for ``grace`` seconds, then terminates them and records them as failed: nothing
is left active.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.executors.local import LocalExecutor
from .backends.stores import open_store
from .backends.stores.base import Database
from .context import EnvPolicy
from .dispatch.executor import Executor
from .dispatch.trust import Refused, SignedPrograms
from .dispatch.worker import Scope, Worker, WorkerConfig
from .logs import get_logger
from .program.model import StepDef

__all__ = ("Agent", "AgentConfig", "Refused", "main", "run_agents")

log = get_logger("aeventor.agent")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What an agent serves and how.

    Attributes:
        hosts: host names whose steps it runs locally.
        ssh_targets: host names whose steps it runs over SSH (name -> SshTarget).
        allow: fnmatch patterns; a step's module (or script path) must match one.
        cluster_key: the HMAC key that signed programs, runs and step runs must verify with.
        pass_env: fnmatch patterns of this process's environment variables its steps
            inherit besides :data:`~aeventor.context.DEFAULT_PASS_ENV` (and that are sent to
            SSH hosts); aeventor's secrets never are.
        log_dir: where the program logs (of the step runs served here) and step logs go.
        log_level: level of those program logs and of the steps' loggers.
    """

    hosts: Sequence[str]
    cluster_key: bytes
    allow: Sequence[str] = ()
    pass_env: Sequence[str] = ()
    ssh_targets: Mapping[str, Any] = field(default_factory=dict)
    max_concurrency: int = 8
    heartbeat: float = 5.0
    lease: float = 30.0
    grace: float = 30.0
    log_dir: Path = field(default_factory=lambda: Path.cwd() / "aeventor_logs")
    log_level: int = logging.INFO

    @property
    def all_hosts(self) -> list[str]:
        return list(dict.fromkeys([*self.hosts, *self.ssh_targets]))


class Agent:
    """Serves the configured hosts on one store until ``stop`` is set: a
    :class:`~aeventor.dispatch.worker.Worker` scoped to the hosts' queues, trusting only
    signed programs whose steps match ``allow``."""

    def __init__(self, *, db: Database, config: AgentConfig) -> None:
        self.db = db
        self.config = config
        env = EnvPolicy.agent(config.pass_env)
        self._local = LocalExecutor(env=env)
        self._ssh: Any = None
        if config.ssh_targets:
            from .backends.executors.ssh import SshExecutor

            self._ssh = SshExecutor(targets=config.ssh_targets, env=env)
        self.programs = SignedPrograms(
            db, key=config.cluster_key, allow=config.allow, hosts=config.all_hosts
        )
        self.worker = Worker(
            store=db,
            scope=Scope(hosts=tuple(config.all_hosts)),
            config=WorkerConfig(
                concurrency=config.max_concurrency,
                lease=config.lease,
                heartbeat=config.heartbeat,
                grace=config.grace,
                reap=True,
                record_abandoned=True,
                log_dir=config.log_dir,
                log_level=config.log_level,
            ),
            programs=self.programs,
            route=self._route,
        )
        self.id = self.worker.id
        self.log = log.bind(agent=self.id, store=repr(db))

    def _route(self, step: StepDef) -> tuple[Executor, StepDef]:
        if step.executor == "inloop":
            # An agent has no loop of the defining process: async functions run in the step
            # runner, which awaits them (forked by the warm pool; over SSH, a fresh one).
            step = dataclasses.replace(step, executor="warm")
        if step.host in self.config.ssh_targets:
            return self._ssh, step
        return self._local, step

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        worker_ready = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.worker.run(stop, ready=worker_ready))
                await worker_ready.wait()
                if any(h not in self.config.ssh_targets for h in self.config.hosts):
                    # Local steps: their warm pool's zygote starts before the first one.
                    self._local.prestart()
                self.log.info("agent.ready", hosts=self.config.all_hosts)
                if ready is not None:
                    ready.set()
        finally:
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        await self._local.aclose()
        if self._ssh is not None:
            await self._ssh.aclose()
        self.log.info("agent.stopped")


async def run_agents(
    stores: Sequence[str],
    config: AgentConfig,
    stop: asyncio.Event,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve every store until ``stop`` is set; one TaskGroup, one agent per store."""
    # Resolving a named store reads the config file: off the loop.
    dbs = [await asyncio.to_thread(open_store, store, program="aeventor-agent") for store in stores]
    readies = [asyncio.Event() for _ in dbs]
    async with asyncio.TaskGroup() as tg:
        for db, agent_ready in zip(dbs, readies, strict=True):
            tg.create_task(_serve(db, config, stop, agent_ready))
        if ready is not None:
            await asyncio.gather(*(r.wait() for r in readies))
            ready.set()


async def _serve(
    db: Database, config: AgentConfig, stop: asyncio.Event, ready: asyncio.Event
) -> None:
    async with db:
        await Agent(db=db, config=config).run(stop, ready=ready)


# -- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m aeventor.agent``: the ``aeventor agent`` command (see :mod:`aeventor.cli`)."""
    from .cli import main as cli_main

    return cli_main(["agent", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
