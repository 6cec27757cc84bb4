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
import fnmatch
import os
import re
import signal
import socket
import sys
import traceback
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from . import signing as _signing
from .backends.executors.local import ExecResult, LocalExecutor, StepLaunch
from .backends.stores import open_store
from .backends.stores.base import Claim, Database, Taker
from .context import launch_env
from .dispatch._state import Graph
from .dispatch.logs import run_log_dir, step_log_path
from .exceptions import AeventorError, ConfigurationError, ExecutorError, NoResult
from .logs import get_logger, stderr_handler
from .program.model import ProgramDef, StepStatus
from .utils import wait_any

__all__ = ("Agent", "AgentConfig", "main", "run_agents")

log = get_logger("aeventor.agent")

_PROGRAM_CACHE = 1024


class Refused(AeventorError):
    """A step run this agent will not execute; the message says why."""


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
    """Serves the configured hosts on one store until ``stop`` is set."""

    def __init__(self, *, db: Database, config: AgentConfig) -> None:
        self.db = db
        self.config = config
        self.id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.log = log.bind(agent=self.id, store=repr(db))
        self._local = LocalExecutor()
        self._ssh: Any = None
        if config.ssh_targets:
            from .backends.executors.ssh import SshExecutor

            self._ssh = SshExecutor(targets=config.ssh_targets)
        self._programs: OrderedDict[str, Graph] = OrderedDict()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._stopping = False
        self._wake = asyncio.Event()
        self._maybe_work = True

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                side = [
                    tg.create_task(self._heartbeat_loop(), name="agent heartbeat"),
                    tg.create_task(self._reaper_loop(), name="agent reaper"),
                ]
                await self._beat()
                self.log.info("agent.ready", hosts=self.config.all_hosts)
                if ready is not None:
                    ready.set()
                await self._claim_loop(tg, stop)
                await self._drain()
                for task in side:
                    task.cancel()
        finally:
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        await self._local.aclose()
        if self._ssh is not None:
            await self._ssh.aclose()
        try:
            await self.db.agent_stopped(self.id)
        except AeventorError as exc:
            self.log.warning("agent.stop_not_recorded", error=str(exc))
        self.log.info("agent.stopped")

    async def _drain(self) -> None:
        """Stop claiming; give running steps ``grace`` seconds, then terminate them."""
        self._stopping = True
        running = list(self._tasks.values())
        if not running:
            return
        self.log.info("agent.draining", running=len(running), grace=self.config.grace)
        _, pending = await asyncio.wait(running, timeout=self.config.grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- claiming -----------------------------------------------------------------------

    async def _claim_loop(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        with self.db.notifier.subscribe(None) as remote:
            while not stop.is_set():
                free = self.config.max_concurrency - len(self._tasks)
                if free > 0 and self._maybe_work:
                    self._maybe_work = False
                    claims = await self.db.claim(
                        worker=self.id,
                        limit=free,
                        hosts=self.config.all_hosts,
                        lease=timedelta(seconds=self.config.lease),
                    )
                    if len(claims) == free:
                        self._maybe_work = True
                    for claim in claims:
                        self._start(tg, claim)
                    if self._maybe_work:
                        continue
                await self._wait(stop, remote)

    def _start(self, tg: asyncio.TaskGroup, claim: Claim) -> None:
        task = tg.create_task(self._execute(tg, claim), name=f"step {claim.step}")
        self._tasks[claim.id] = task

    async def _wait(self, stop: asyncio.Event, remote: asyncio.Event) -> None:
        await wait_any(stop, remote, self._wake, poll=self.db.poll_interval)
        # A remote wake-up or a poll: look again. Our own completions set _maybe_work.
        if remote.is_set() or not self._wake.is_set():
            self._maybe_work = True
        remote.clear()
        self._wake.clear()

    # -- provenance ---------------------------------------------------------------------

    async def _graph(self, run_id: str) -> Graph:
        """The verified program of a run (cached)."""
        cached = self._programs.get(run_id)
        if cached is not None:
            self._programs.move_to_end(run_id)
            return cached
        program, facts = await self.db.run_provenance(run_id)
        key = self.config.cluster_key
        if program.version != facts["version"] or program.canonical_json() != facts["definition"]:
            raise Refused(
                f"program {facts['name']!r}: stored definition does not match its version"
            )
        expected = _signing.definition_signature(
            key, facts["name"], facts["version"], facts["definition"]
        )
        if not _signing.verify(facts["program_signature"], expected):
            raise Refused(
                f"program {facts['name']!r} version {facts['version']}: its signature does not "
                "verify with this agent's cluster key (tampered, or submitted with another key)"
            )
        run_expected = _signing.run_signature(
            key, run_id=run_id, program_id=facts["program_id"], version=facts["version"]
        )
        if not _signing.verify(facts["run_signature"], run_expected):
            raise Refused(
                f"run {run_id}: its signature does not verify with this agent's cluster key"
            )
        graph = Graph(program)
        self._programs[run_id] = graph
        if len(self._programs) > _PROGRAM_CACHE:
            self._programs.popitem(last=False)
        return graph

    def _check_allowed(self, program: ProgramDef, step_name: str) -> None:
        step = program.steps[step_name]
        if step.local_only:
            raise Refused(
                f"step {step_name!r} is an in-loop closure that only the defining process can "
                "run; define it at module level to run it on an agent"
            )
        if step.argv is not None:
            # A command is code too: its program must be allowed like a module.
            candidates = [step.argv[0]]
        elif step.target is None:
            return  # a no-op runs nothing
        else:
            module = step.target.partition(":")[0]
            candidates = [module] + ([step.main_path] if step.main_path else [])
        if not any(
            fnmatch.fnmatchcase(candidate, pattern)
            for candidate in candidates
            for pattern in self.config.allow
        ):
            shown = candidates[-1]
            raise Refused(
                f"step {step_name!r}: {shown!r} is not allowed on this agent; start the agent "
                f"with --allow {shown!r} (or a pattern matching it)"
            )

    # -- executing ----------------------------------------------------------------------

    async def _execute(self, tg: asyncio.TaskGroup, claim: Claim) -> None:
        bound = self.log.bind(run_id=claim.run_id, step=claim.step, sequence=claim.sequence)
        graph: Graph | None = None
        try:
            try:
                graph = await self._graph(claim.run_id)
                self._check_allowed(graph.program, claim.step)
            except Refused as exc:
                bound.error("step.refused", reason=str(exc))
                await self._record_refusal(claim, f"refused by agent {self.id}: {exc}")
                return
            result = await self._launch(graph, claim, bound)
            status = StepStatus.success if result.ok else StepStatus.failure
            free = self.config.max_concurrency - len(self._tasks) + 1
            advance = await self.db.complete(
                graph,
                claim,
                status=status,
                result=result.value,
                error=result.error,
                take=None
                if self._stopping
                else Taker(
                    worker=self.id,
                    budget=max(free, 0),
                    hosts=frozenset(self.config.all_hosts),
                    lease=timedelta(seconds=self.config.lease),
                ),
            )
            bound.info("step.ended", status=status.value)
            for next_claim in advance.claims:
                self._start(tg, next_claim)
            if advance.ready:
                self._maybe_work = True
        except asyncio.CancelledError:
            if graph is not None and self._stopping:
                reason = (
                    f"terminated: agent {self.id} shut down and the step outlived the "
                    f"{self.config.grace:g}s grace period"
                )
                bound.warning("step.terminated", reason=reason)
                await asyncio.shield(
                    self.db.complete(graph, claim, status=StepStatus.failure, error=reason)
                )
            raise
        finally:
            self._tasks.pop(claim.id, None)
            self._wake.set()

    async def _launch(self, graph: Graph, claim: Claim, bound: Any) -> ExecResult:
        step = graph.program.steps[claim.step]
        if step.executor == "inloop":
            # An agent has no loop of the defining process: async functions run in the step
            # runner, which awaits them.
            step = _as_process(step)
        env = launch_env(
            claim, step, program=graph.program.name, logger_name=f"{graph.program.name}.step"
        )
        run_dir = run_log_dir(self.config.log_dir, graph.program.name, claim.run_id)

        async def on_started(pid: int) -> None:
            bound.info("step.started", pid=pid, host=step.host)
            if (await self.db.started(graph, claim, pid=pid)).ready:
                self._maybe_work = True
                self._wake.set()

        launch = StepLaunch(
            claim=claim,
            step=step,
            program=graph.program.name,
            env=env,
            log_path=step_log_path(run_dir, claim.step, claim.sequence, claim.attempt),
            deterministic_logs=False,
            on_started=on_started,
        )
        executor = self._ssh if step.host in self.config.ssh_targets else self._local
        no_op = step.target is None and step.argv is None
        if no_op and (await self.db.started(graph, claim)).ready:
            self._maybe_work = True
            self._wake.set()
        try:
            result: ExecResult = await executor.run(launch)
        except ExecutorError as exc:
            result = ExecResult(ok=False, error="".join(traceback.format_exception(exc)))
        return result

    async def _record_refusal(self, claim: Claim, reason: str) -> None:
        # The refused program is not trusted to say what a failure fires: the run stops.
        await self.db.fail_untrusted(claim, error=reason)

    # -- heartbeat and leases -----------------------------------------------------------

    async def _beat(self) -> None:
        cancelled = await self.db.agent_heartbeat(
            agent_id=self.id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            hosts=self.config.all_hosts,
            lease=timedelta(seconds=self.config.lease),
        )
        for step_run_id in cancelled:
            task = self._tasks.get(step_run_id)
            if task is not None:
                self.log.info("step.cancelled", step_run_id=step_run_id)
                task.cancel()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat)
            await self._beat()

    async def _reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease / 2)
            for claim in await self.db.lapsed_leases():
                try:
                    graph = await self._graph(claim.run_id)
                except Refused:
                    await self.db.fail_untrusted(claim, error="lost: its lease lapsed")
                    continue
                except NoResult:
                    continue
                self.log.warning("step.lost", run_id=claim.run_id, step=claim.step)
                advance = await self.db.complete(
                    graph,
                    claim,
                    status=StepStatus.failure,
                    error="lost: the lease of its worker lapsed (the worker died or hung)",
                    only_if_lapsed=True,
                )
                if advance.ready:
                    # What the failure made ready may be ours; our own NOTIFY does not wake us.
                    self._maybe_work = True
                    self._wake.set()


def _as_process(step: Any) -> Any:
    import dataclasses

    return dataclasses.replace(step, executor="process")


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
    # The library logs to the standard library's "aeventor.*" loggers; the program decides
    # where they go: stderr, as console lines or JSON lines.
    import logging

    handler = stderr_handler(json_lines=json_lines, colors=sys.stderr.isatty())
    logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)
    # Other libraries' structlog loggers (stamina's retry messages) go the same way.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
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
