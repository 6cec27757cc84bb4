"""Real agent processes for the acceptance tests, and waiting on conditions with deadlines.

An agent is ``python -m aeventor.agent`` started with :func:`asyncio.create_subprocess_exec`,
logging JSON lines to a file. It is ready once it logged ``agent.ready``; it is stopped with
SIGTERM and waited for, and killed when it outlives its deadline. Nothing here sleeps to let
time pass: :func:`wait_until` polls a condition and fails, naming it, at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from aeventor.backends.stores import open_store
from aeventor.backends.stores import schema as _schema

from ..waiting import (  # noqa: F401 - re-exported for the tests of this suite
    DEADLINE,
    pid_alive,
    session_members,
    wait_until,
    within,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
#: The cluster key of the tests' agents and submitters.
CLUSTER_KEY = "acceptance-cluster-key-0123456789abcdef"
#: Another valid key: what it signs, the agents refuse.
OTHER_KEY = "some-other-cluster-key-fedcba9876543210"
#: What the tests' agents run: the step functions by module, or by path when a script.
ALLOW = ("tests.acceptance.*", f"{HERE}/*.py")
#: Fast heartbeats and short leases, so the tests do not wait on them.
AGENT_TIMING = ("--heartbeat", "0.5", "--lease", "5")
#: Seconds an agent may take to exit after SIGTERM (its steps' grace included).
STOP_DEADLINE = 20.0


def subprocess_env(key: str = CLUSTER_KEY, **extra: str) -> dict[str, str]:
    """The environment of agents and submitters: the cluster key, and this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEVENTOR_")}
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return {**env, "AEVENTOR_CLUSTER_KEY": key, "PYTHONPATH": path, **extra}


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of ``text`` (other lines are skipped)."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


# -- processes -----------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """One ``python -m aeventor.agent`` process and its log (JSON lines on stderr)."""

    proc: asyncio.subprocess.Process
    log_path: Path
    argv: Sequence[str]
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return read_text(self.log_path)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The agent's log records (those of ``event`` only, when given)."""
        records = json_lines(self.log())
        return [r for r in records if event is None or r.get("event") == event]

    def ran(self, worker: str | None) -> bool:
        """Whether a step run's ``worker`` is this agent (``hostname:pid:...``)."""
        return worker is not None and worker.split(":")[1] == str(self.pid)

    async def wait_ready(self, *, deadline: float = DEADLINE) -> None:
        async def ready() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"agent {' '.join(self.argv)} exited with {self.proc.returncode} before it "
                    f"was ready:\n{self.log()}"
                )
            return bool(await asyncio.to_thread(self.records, "agent.ready"))

        await wait_until(ready, what=f"agent {self.pid} to log agent.ready", deadline=deadline)

    async def stop(self, *, deadline: float = STOP_DEADLINE) -> int:
        """SIGTERM the agent and wait for it; kill it after ``deadline`` seconds."""
        self.stopped = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(deadline):
                return await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise AssertionError(
                f"agent {self.pid} did not exit within {deadline} s of SIGTERM (killed):\n"
                f"{self.log()}"
            ) from None


@dataclass
class Agents:
    """Starts agents for one test; :meth:`aclose` stops those still running."""

    log_dir: Path
    started: list[AgentProcess] = field(default_factory=list)

    async def start(
        self,
        store: str,
        *hosts: str,
        allow: Sequence[str] = ALLOW,
        ssh_hosts: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        key: str = CLUSTER_KEY,
        ready: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> AgentProcess:
        """Start ``python -m aeventor.agent`` serving ``hosts`` on ``store``; wait until ready.

        Args:
            ssh_hosts: host name -> ``[USER@]ADDRESS[:PORT]`` served over SSH (``args`` must
                then carry ``--known-hosts`` and ``--client-key``).
            env: more environment variables of the agent.
        """
        argv = ["--store", store, "--json-logs", *AGENT_TIMING]
        argv += ["--log-dir", str(self.log_dir / "steps")]
        for host in hosts:
            argv += ["--host", host]
        for name, address in (ssh_hosts or {}).items():
            argv += ["--ssh-host", f"{name}={address}"]
        for pattern in allow:
            argv += ["--allow", pattern]
        argv += list(args)
        log_path = self.log_dir / f"agent-{len(self.started)}-{'-'.join(hosts) or 'ssh'}.log"
        log = await asyncio.to_thread(_open_log, log_path)
        with log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aeventor.agent",
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=subprocess_env(key, **(env or {})),
                cwd=ROOT,
            )
        agent = AgentProcess(proc, log_path, argv)
        self.started.append(agent)
        if ready:
            await agent.wait_ready()
        return agent

    async def aclose(self) -> None:
        errors = []
        for agent in self.started:
            if agent.proc.returncode is None:
                try:
                    await agent.stop()
                except AssertionError as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]


def _open_log(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")  # the caller closes it once the child has it


# -- the store -----------------------------------------------------------------------------


async def select_rows(store: str, query: sa.Select[Any]) -> list[sa.Row[Any]]:
    async with open_store(store, program="acceptance") as db, db.reading() as conn:
        return list((await conn.execute(query)).all())


async def run_rows(store: str) -> list[sa.Row[Any]]:
    return await select_rows(store, sa.select(_schema.run))


async def program_rows(store: str) -> list[sa.Row[Any]]:
    return await select_rows(store, sa.select(_schema.program))


async def agent_rows(store: str) -> list[sa.Row[Any]]:
    return await select_rows(store, sa.select(_schema.agent))


async def execute(store: str, statement: sa.Executable) -> None:
    async with open_store(store, program="acceptance") as db, db.transaction() as conn:
        await conn.execute(statement)
