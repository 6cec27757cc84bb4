"""The per-host agent: ``python -m aeventor.agent`` (also ``aeventor agent``).

An agent serves one or more host names on one or more stores. For each store it runs one
:class:`asyncio.TaskGroup` that owns the claim loop, the heartbeat and the lease reaper; a
child that crashes stops the agent (nothing dies silently). It claims step runs queued for its
hosts (woken by LISTEN/NOTIFY on Postgres, by polling on MySQL), checks where each came from
(signed program and run, allowed module), runs it as a subprocess (locally, or over SSH for
hosts configured as SSH targets), and records the outcome together with everything it causes
in one transaction.

Heartbeats are one batched update per agent (its row and the leases of all its step runs). A
step run whose lease lapses (its agent died) is recorded as a failure by any agent's reaper,
and its failure triggers fire. On SIGTERM or SIGINT the agent stops claiming, lets running
steps finish for ``grace`` seconds, then terminates them and records them as failed: nothing
is left active.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from . import signing as _signing
from .backends.executors.local import LocalExecutor
from .backends.stores import open_store
from .backends.stores.base import Database
from .dispatch.executor import Executor
from .dispatch.trust import Refused, SignedPrograms
from .dispatch.worker import Scope, Worker, WorkerConfig
from .exceptions import ConfigurationError, ExecutorError
from .program.model import ProgramDef, StepDef

__all__ = ("Agent", "AgentConfig", "Refused", "main", "run_agents")

log = structlog.get_logger("aeventor.agent")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What an agent serves and how.

    Attributes:
        hosts: host names whose steps it runs locally.
        ssh_targets: host names whose steps it runs over SSH (name -> SshTarget).
        allow: fnmatch patterns; a step's module (or script path) must match one.
        cluster_key: the HMAC key that signed programs and runs must verify with.
    """

    hosts: Sequence[str]
    cluster_key: bytes
    allow: Sequence[str] = ()
    ssh_targets: Mapping[str, Any] = field(default_factory=dict)
    max_concurrency: int = 8
    heartbeat: float = 5.0
    lease: float = 30.0
    grace: float = 30.0
    log_dir: Path = field(default_factory=lambda: Path.cwd() / "aeventor_logs")

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
        self._local = LocalExecutor()
        self._ssh: Any = None
        if config.ssh_targets:
            from .backends.executors.ssh import SshExecutor

            self._ssh = SshExecutor(targets=config.ssh_targets)
        self.programs = SignedPrograms(db, key=config.cluster_key, allow=config.allow)
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
            ),
            programs=self.programs,
            route=self._route,
        )
        self.id = self.worker.id
        self.log = log.bind(agent=self.id, store=repr(db))

    def _check_allowed(self, program: ProgramDef, step_name: str) -> None:
        self.programs.check_step(program, step_name)

    def _route(self, step: StepDef) -> tuple[Executor, StepDef]:
        if step.executor == "inloop":
            # An agent has no loop of the defining process: async functions run in the step
            # runner, which awaits them.
            step = dataclasses.replace(step, executor="process")
        if step.host in self.config.ssh_targets:
            return self._ssh, step
        return self._local, step

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        worker_ready = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.worker.run(stop, ready=worker_ready))
                await worker_ready.wait()
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
    dbs = [open_store(store, program="aeventor-agent") for store in stores]
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aeventor.agent", description="Run the aeventor agent of this host."
    )
    parser.add_argument("--store", action="append", required=True, help="repeatable")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name served locally (repeatable; default: this machine's host name)",
    )
    parser.add_argument(
        "--ssh-host",
        action="append",
        default=[],
        metavar="NAME=[USER@]ADDRESS[:PORT]",
        help="a host served over SSH (repeatable)",
    )
    parser.add_argument("--known-hosts", help="known_hosts file for SSH hosts")
    parser.add_argument("--client-key", action="append", default=None, help="SSH key file")
    parser.add_argument("--ssh-python", default=sys.executable, help="remote python")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        help=(
            "fnmatch pattern of the modules, script paths and commands (argv[0]) whose "
            "steps may run (repeatable)"
        ),
    )
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--log-dir", type=Path, default=Path.cwd() / "aeventor_logs")
    parser.add_argument("--json-logs", action="store_true", help="log JSON lines")
    return parser


def parse_ssh_host(spec: str, args: argparse.Namespace) -> tuple[str, Any]:
    from .backends.executors.ssh import SshTarget

    name, sep, address = spec.partition("=")
    if not sep or not name or not address:
        raise ConfigurationError(
            f"--ssh-host {spec!r}: write it as NAME=[USER@]ADDRESS[:PORT], e.g. s2=root@10.0.0.2"
        )
    user, _, hostport = address.rpartition("@")
    host, _, port = hostport.partition(":")
    return name, SshTarget(
        host=host,
        port=int(port) if port else 22,
        user=user or None,
        client_keys=args.client_key,
        known_hosts=args.known_hosts,
        python=args.ssh_python,
    )


def _configure_logging(json_lines: bool) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def _main_async(args: argparse.Namespace) -> None:
    ssh_targets = dict(parse_ssh_host(spec, args) for spec in args.ssh_host)
    config = AgentConfig(
        hosts=args.host
        if args.host is not None
        else ([] if ssh_targets else [socket.gethostname()]),
        cluster_key=_signing.load_cluster_key(),
        allow=args.allow,
        ssh_targets=ssh_targets,
        max_concurrency=args.max_concurrency,
        heartbeat=args.heartbeat,
        lease=args.lease,
        grace=args.grace,
        log_dir=args.log_dir,
    )
    if not config.allow:
        log.warning(
            "agent.nothing_allowed",
            hint="no --allow pattern: every step will be refused; pass --allow 'mypkg.*'",
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_agents(args.store, config, stop)


def _start_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aeventor agent start",
        description="Start an agent on another host over SSH; arguments after -- go to it.",
    )
    parser.add_argument(
        "--host",
        help="the host name the agent serves (passed to it as --host); also the SSH "
        "destination when --ssh is not given",
    )
    parser.add_argument(
        "--ssh", metavar="[USER@]ADDRESS[:PORT]", help="where to reach it (default: --host)"
    )
    parser.add_argument("--known-hosts")
    parser.add_argument("--client-key", action="append", default=None)
    parser.add_argument("--python", default=sys.executable, help="python on that host")
    parser.add_argument(
        "--forward-env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable to the agent (repeatable)",
    )
    parser.add_argument("--log", help="the agent's log file there")
    parser.add_argument("agent_args", nargs=argparse.REMAINDER)
    return parser


async def start_remote(
    target: Any, agent_args: Sequence[str], *, env: Mapping[str, str], log_file: str
) -> int:
    """Start ``python -m aeventor.agent`` on an SSH host, detached; return its pid there."""
    import shlex

    from .backends.executors.ssh import SshExecutor

    executor = SshExecutor(targets={"target": target})
    try:
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        command = (
            f"{'env ' + assignments + ' ' if assignments else ''}nohup "
            f"{shlex.quote(target.python)} -m aeventor.agent "
            + " ".join(shlex.quote(a) for a in agent_args)
            + f" > {shlex.quote(log_file)} 2>&1 < /dev/null & echo aeventor-agent-pid=$!"
        )
        status, out, err = await executor.shell("target", command)
        if status != 0:
            raise ConfigurationError(f"starting the agent over SSH failed ({status}): {err}")
        # Found by its tag: SshExecutor.shell() returns str(bytes) ("b'123\\n'"), not text.
        found = re.search(r"aeventor-agent-pid=(\d+)", out)
        if found is None:
            raise ConfigurationError(
                f"the agent was started over SSH, but its pid is not in the output: {out!r}"
            )
        return int(found.group(1))
    finally:
        await executor.aclose()


def start_main(argv: list[str] | None = None) -> int:
    parser = _start_parser()
    args = parser.parse_args(argv)
    agent_args = [a for a in args.agent_args if a != "--"] if args.agent_args else []
    if args.host is None and args.ssh is None:
        parser.error("name the host with --host NAME (and --ssh ADDRESS if NAME does not resolve)")
    if args.host is not None:
        agent_args = ["--host", args.host, *agent_args]
    destination = args.ssh or args.host
    _, target = parse_ssh_host(
        f"target={destination}",
        argparse.Namespace(
            client_key=args.client_key, known_hosts=args.known_hosts, ssh_python=args.python
        ),
    )
    env = {name: os.environ[name] for name in args.forward_env if name in os.environ}
    log_file = args.log or f"/tmp/aeventor-agent-{os.getpid()}.log"
    try:
        pid = asyncio.run(start_remote(target, agent_args, env=env, log_file=log_file))
    except (ConfigurationError, ExecutorError) as exc:
        print(f"aeventor agent start: {exc}", file=sys.stderr)  # noqa: T201 - CLI
        return 2
    print(f"agent started on {destination}: pid {pid}, log {log_file}")  # noqa: T201 - CLI
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.json_logs)
    try:
        asyncio.run(_main_async(args))
    except ConfigurationError as exc:
        print(f"aeventor agent: {exc}", file=sys.stderr)  # noqa: T201 - CLI
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
