"""The public program API: :class:`Eventor`, its events and steps, and :class:`RunHandle`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy.engine import URL

from ._signals import drain_on_sigterm
from .backends.executors.local import LocalExecutor
from .backends.stores import open_store
from .backends.stores.base import Database
from .dispatch import Graph
from .dispatch.claims import Advance
from .dispatch.logs import RunLog
from .dispatch.trust import OwnProgram
from .dispatch.worker import Scope, Worker, WorkerConfig
from .exceptions import (
    AeventorError,
    ConfigurationError,
    NoResult,
    NothingToRecover,
    ProgramChanged,
    ProgramDefinitionError,
    RecoveryRefused,
    RunStillRunning,
)
from .guard import check_not_importing
from .logs import get_logger
from .program.builder import (
    Event,
    Group,
    ProgramBuilder,
    Step,
    check_limit,
    check_name,
    name_of,
)
from .program.model import EventDef, ProgramDef, Retry, RunStatus, StepDef, StepStatus
from .records import RunResult
from .signing import load_cluster_key, step_run_signer
from .submission import follow, submit

__all__ = ("Event", "Eventor", "Group", "RunHandle", "Step", "attach")

log = get_logger("aeventor")


def _program_name() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else "aeventor"


def _level(value: int | str | None) -> int:
    if value is None:
        return logging.INFO
    if isinstance(value, int):
        return value
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ConfigurationError(
            f"logging_level={value!r} is not a level; use logging.DEBUG/INFO/WARNING/ERROR "
            "or their names"
        )
    return level


class Eventor:
    """A program of events and steps, and the runs of it.

    Args:
        name: the program's name (default: the running script's file name).
        store: where runs are kept: a SQLAlchemy URL (``postgresql+asyncpg://...``,
            ``mysql+aiomysql://...``, ``sqlite+aiosqlite:///path``), a sqlite file path,
            ``":memory:"``, or the name of a store in the config file. Default: the sqlite
            file ``<program>.run.db`` in the working directory.
        logging_level: level of the program log and of the steps' logger
            (``EVENTOR_LOGGER_NAME``), ``logging.INFO`` by default.
        log_dir: where run logs go (default ``./aeventor_logs``).
        deterministic_logs: write logs without timestamps, pids and run ids, and rewrite
            the program log in a fixed order when the run ends, so runs can be diffed.
        stop_on_exception: a step failure that fires no failure trigger stops the run.
        max_concurrency: most step runs of a run executing at once (default: no limit):
            its worker's limit in standalone mode; in distributed mode a limit across the
            agents, kept in the store like a pool's slots.
        max_concurrency_per_host: most step runs executing at once on each host, counted
            across every run (of any program) that sets it: a ``local`` pool of that size on
            each host, which every step of this program takes one slot of.
        poll_interval: seconds between polls for work made by other processes; the store's
            default when None (sqlite in standalone mode needs none).
        mode: ``"standalone"`` (this process runs every step) or ``"distributed"`` (the run is
            submitted to the store, and the agents of each step's host run the steps; the
            store must be shared: Postgres or MySQL).
        default_host: in distributed mode, the host of steps that name none (see the host
            rules in the README).
        cluster_key: the key that signs submitted programs (default: from
            ``$AEVENTOR_CLUSTER_KEY`` or the cluster key file).
        lease: seconds a step run's claim holds without renewal (as the agent's
            ``--lease``). The run's worker renews its leases on a heartbeat, so another
            process (an agent's reaper, an operator) can tell when this process died.
        grace: seconds running steps get to finish when the run is stopped by SIGTERM (as
            the agent's ``--grace``); then they are terminated and the run is recorded
            ``cancelled``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        store: str | URL | Path | None = None,
        logging_level: int | str | None = None,
        log_dir: str | Path | None = None,
        deterministic_logs: bool = False,
        stop_on_exception: bool = True,
        max_concurrency: int | None = None,
        max_concurrency_per_host: int | None = None,
        poll_interval: float | None = None,
        mode: str = "standalone",
        default_host: str | None = None,
        cluster_key: bytes | str | None = None,
        lease: float = 30.0,
        grace: float = 30.0,
    ) -> None:
        self.name = name if name is not None else _program_name()
        check_name(self.name, "program")
        if mode not in ("standalone", "distributed"):
            raise ConfigurationError(
                f"mode={mode!r}: use 'standalone' (steps run here) or 'distributed' (steps run "
                "on their hosts' agents)"
            )
        if default_host is not None:
            check_name(default_host, "default_host")
        self.mode = mode
        self.default_host = default_host
        self._cluster_key = cluster_key.encode() if isinstance(cluster_key, str) else cluster_key
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigurationError(
                f"max_concurrency={max_concurrency!r}: must be at least 1, or None for no limit"
            )
        self.store = store
        self.level = _level(logging_level)
        self.log_dir = Path(log_dir) if log_dir is not None else Path.cwd() / "aeventor_logs"
        self.deterministic_logs = deterministic_logs
        self.stop_on_exception = stop_on_exception
        if not lease > 0:
            raise ConfigurationError(f"lease={lease!r}: seconds, more than 0 (default 30)")
        if not grace >= 0:
            raise ConfigurationError(f"grace={grace!r}: seconds, 0 or more (default 30)")
        self.max_concurrency = max_concurrency
        self.max_concurrency_per_host = check_limit(
            max_concurrency_per_host, "max_concurrency_per_host"
        )
        self.poll_interval = poll_interval
        self._builder = ProgramBuilder()
        self.lease = float(lease)
        self.grace = float(grace)
        self._db: Database | None = None
        self._opening: asyncio.Event | None = None
        #: Held open by ``async with``.
        self._held = False
        #: Runs and handles using the store.
        self._live = 0
        #: Tasks of runs started with start(), until they end.
        self._started: set[asyncio.Task[RunResult]] = set()

    def __repr__(self) -> str:
        return f"<Eventor {self.name!r} events={len(self._events)} steps={len(self._steps)}>"

    # -- definition ---------------------------------------------------------------------

    def add_event(self, name: str, expr: Any = None) -> Event:
        """Define an event; with ``expr``, a derived event.

        A derived event fires for a sequence when its expression over other events holds
        for that sequence: a tuple means AND, :func:`aeventor.or_` means OR, and they nest.

        Raises:
            ProgramDefinitionError: a duplicate or bad name, or a malformed expression.
        """
        return self._builder.add_event(name, expr)

    def add_group(
        self,
        name: str,
        *,
        host: str | None = None,
        env: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        max_concurrent: int | None = None,
    ) -> Group:
        """Define a group of steps sharing properties.

        Args:
            host: the host of member steps that name none.
            env: environment variables of member steps (a step's own ``env`` wins).
            config: default step config of members (the keys :meth:`add_step` takes).
            max_concurrent: at most this many runs of the group's steps at once in a run
                (also the config key ``max_concurrent``).

        .. versionadded:: 0.1
        """
        return self._builder.add_group(
            name, host=host, env=env, config=config, max_concurrent=max_concurrent
        )

    def add_pool(self, name: str, size: int, *, scope: str = "program") -> None:
        """Define a counted pool of ``size`` slots that steps take (``add_step(...,
        acquires=[(name, n)])``).

        A step run takes all the slots it asks for, of every pool, at once before it starts,
        or waits holding none: no partial hold, no deadlock. Waiting step runs are served in
        order (the higher ``priority`` first, then first come, first served), and a later
        one never overtakes an earlier one that waits for the same pool. The slots go back
        in the transaction that records the step's end, and a step run whose worker died
        gives them back when its lease lapses.

        Args:
            size: how many slots.
            scope: ``"program"`` (each run has a pool of its own), ``"local"`` (one pool per
                host, shared by every run on it that defines it) or ``"cluster"`` (one pool
                for every host, through the database). Programs sharing a local or cluster
                pool should give it the same size: a step is admitted against the size its
                own program gives.

        Raises:
            ProgramDefinitionError: a duplicate or bad name, a size below 1, an unknown scope.

        .. versionadded:: 0.1
        """
        self._builder.add_pool(name, size, scope=scope)

    def add_step(
        self,
        name: str,
        func: Callable[..., Any] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        triggers: Mapping[StepStatus | str, Any] | None = None,
        host: str | None = None,
        *,
        command: Sequence[str] | None = None,
        executor: str | None = None,
        sequence_arg_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        group: Group | str | None = None,
        env: Mapping[str, str] | None = None,
        recovery: str | None = None,
        timeout: float | None = None,
        retry: Retry | Mapping[str, Any] | None = None,
        acquires: Iterable[tuple[str, int]] | None = None,
        releases: Iterable[tuple[str, int]] | None = None,
        max_concurrent: int | None = None,
        priority: int | None = None,
    ) -> Step:
        """Define a step.

        Args:
            func: what the step runs; None makes a no-op that succeeds. A plain function
                runs in a process of its own that imports it by path (so it must be defined
                at module level): by default (``"warm"``) a process forked by the warm pool,
                which imported it once; an ``async def`` runs in the engine's loop by
                default.
            args, kwargs: JSON-serialisable arguments.
            triggers: ``{StepStatus.success: (event, ...), ...}`` for the statuses ready,
                active, success, failure and complete (= success or failure).
            host: the host the step is assigned to (recorded; used in distributed mode).
            command: an argv to run instead of a function (exit code 0 is success).
            executor: ``"warm"``, ``"process"`` (a fresh interpreter for each run),
                ``"inloop"`` or ``"command"`` to override the default.
            sequence_arg_name: pass the sequence to ``func`` as this keyword argument.
            config: the original eventor's per-step config keys ``task_construct``
                (``"process"`` or ``"invoke"``), ``executor``, ``sequence_arg_name`` and
                ``recovery``.
            group: a group (see :meth:`add_group`) whose host, env and config apply.
            env: extra environment variables of the step.
            recovery: what recovering a run (:func:`aeventor.recover`) does with a run of
                this step that did not succeed (failed, lost, cancelled or skipped):
                ``"rerun"`` (the default) runs it again as a new attempt, ``"skip"`` keeps
                its outcome (the original's step replay). A run that succeeded is never
                executed again.
            timeout: seconds a run of the step may take. Then it is terminated (a process
                step's whole process group gets SIGTERM, then SIGKILL after 5 s; an in-loop
                step is cancelled) and fails with a ``TimeoutError``, which fires its
                failure triggers (after its last attempt, with ``retry``).
            retry: how failed runs of the step are tried again (:class:`aeventor.Retry`, or
                a dict of its arguments): each attempt is a step run of its own with its
                own log; the failure triggers fire only after the last attempt.
            acquires: ``[(pool, slots), ...]`` taken all at once before a run of the step
                starts (see :meth:`add_pool`); until then the step run is ``waiting``.
            releases: ``[(pool, slots), ...]`` given back when a run of the step ends
                (default: what it acquired). A step can keep slots for its run (``[]``) for
                a later step to release; whatever a run still holds is given back when the
                run ends.
            max_concurrent: at most this many runs of the step at once in a run, across
                its sequences.
            priority: among step runs waiting for the same slots, higher goes first
                (default 0; equal priorities are served first come, first served).

        Raises:
            ProgramDefinitionError: a duplicate name, a bad trigger, a callable that cannot
                be imported by path, or conflicting arguments.
            SerializationError: an argument that JSON cannot carry.
        """
        return self._builder.add_step(
            name,
            func,
            args,
            kwargs,
            triggers,
            host,
            command=command,
            executor=executor,
            sequence_arg_name=sequence_arg_name,
            config=config,
            group=group,
            env=env,
            recovery=recovery,
            timeout=timeout,
            retry=retry,
            acquires=acquires,
            releases=releases,
            max_concurrent=max_concurrent,
            priority=priority,
        )

    def add_assoc(self, event: Event | str, *targets: Step | Event | str, delay: float = 0) -> None:
        """Make ``event`` fan out to steps and/or other events; with ``delay``, that many
        seconds after it fires.

        A delay is durable: when the event fires, the time the targets are due is stored
        with the run, and the run's worker (an agent, for a distributed run) fires them then,
        even after a restart of every process (a standalone run's dead controller is
        replaced by recovering the run). A run with a delay pending is still running.

        Raises:
            ProgramDefinitionError: an unknown event or target, or a negative delay.
        """
        self._builder.add_assoc(event, *targets, delay=delay)

    def trigger_event(self, event: Event | str, sequence: str | int = 0) -> None:
        """Fire ``event`` for ``sequence`` when the next run starts (idempotent).

        To fire an event into a live run, use :meth:`RunHandle.trigger_event` or
        ``aeventor.current_step().trigger(...)`` from an in-loop step.
        """
        if self._live:
            raise AeventorError(
                f"trigger_event({name_of(event)!r}) while a run is live: it would only apply "
                "to the next run. Use `await handle.trigger_event(...)` on the handle of the "
                "live run, or `await aeventor.current_step().trigger(...)` inside a step"
            )
        self._builder.trigger_event(event, sequence)

    # -- program as data ----------------------------------------------------------------

    @property
    def program(self) -> ProgramDef:
        """The program's definition as data (validated).

        Built once after each change to the definition (any ``add_*``) and kept: reading it
        again returns the same object, without building or validating it again.
        """
        return self._builder.program(
            name=self.name,
            stop_on_exception=self.stop_on_exception,
            distributed=self.mode == "distributed",
            default_host=self.default_host,
            # A standalone run's worker applies max_concurrency itself.
            max_concurrent=self.max_concurrency if self.mode == "distributed" else None,
            host_max_concurrent=self.max_concurrency_per_host,
        )

    # What the run code reads of the definition.

    @property
    def _events(self) -> Mapping[str, EventDef]:
        return self._builder.events

    @property
    def _steps(self) -> Mapping[str, StepDef]:
        return self._builder.steps

    @property
    def _funcs(self) -> Mapping[str, Callable[..., Any]]:
        return self._builder.funcs

    @property
    def _triggers(self) -> Sequence[tuple[str, str]]:
        return self._builder.triggers

    # -- running ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        check_not_importing()
        await self._open()
        self._held = True
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Leave the block: runs started with :meth:`start` that are still live are waited
        for; if the block is left by an exception (or cancelled while waiting), they are
        cancelled and recorded as such. Then the store is closed."""
        started = [task for task in self._started if not task.done()]
        try:
            if started:
                if exc_type is not None:
                    for task in started:
                        task.cancel()
                try:
                    await asyncio.wait(started)
                except asyncio.CancelledError:
                    for task in started:
                        task.cancel()
                    await asyncio.shield(asyncio.wait(started))
                    raise
        finally:
            self._held = False
            if not self._live:
                await self.close()

    async def _open(self) -> Database:
        while self._db is None:
            if self._opening is not None:
                # Another run is opening the store: use it (or open it, if that failed).
                await self._opening.wait()
                continue
            opening = self._opening = asyncio.Event()
            try:
                # Resolving a named store reads the config file: off the loop.
                db = await asyncio.to_thread(
                    open_store, self.store, program=self.name, poll_interval=self.poll_interval
                )
                await db.open()
                self._db = db
            finally:
                self._opening = None
                opening.set()
        return self._db

    async def close(self) -> None:
        """Close the store.

        Raises:
            AeventorError: runs of this Eventor are still live (wait for or cancel them).
        """
        if self._live:
            raise AeventorError(
                f"Eventor {self.name!r}: {self._live} run(s) still live; wait for them "
                "(`await handle.wait()`) or cancel them before closing the store"
            )
        db, self._db = self._db, None
        if db is not None:
            await db.aclose()

    async def run(self, *, recover: str | None = None, force: bool = False) -> RunResult:
        """Run the program until nothing is pending and return the result.

        The result is truthy on success and falsy when a step failure that fired no failure
        trigger stopped the run. Cancelling the awaiting task terminates running steps and
        records the run as cancelled (in distributed mode: for every host).

        Args:
            recover: the id (or a unique prefix) of an earlier run of this program to
                continue instead of starting a new one: its step runs that succeeded are
                kept, those that failed, were lost, cancelled or skipped run again (as
                their step's ``recovery`` policy says), and what they trigger follows. A
                run whose controller died is recovered too (see :func:`aeventor.recover`).
            force: recover the run with this program even though its definition changed
                since the run was made (another version); without it that is refused.

        Raises:
            RunStillRunning: (``recover``) the run's controller or a worker running its
                steps is alive.
            NothingToRecover: (``recover``) the run succeeded, or nothing is to run again.
            ProgramChanged: (``recover``) this program is another version than the run's.

        .. versionchanged:: 0.1
            ``recover`` and ``force``.
        """
        check_not_importing()
        if recover is not None:
            return await self._recover(recover, force=force, program=self.program)
        state = _RunState(uuid.uuid4().hex, cancel_on_cancel=True)
        if self.mode == "distributed":
            return await self._run_distributed(state, self.program)
        return await self._run(state, self.program)

    def start(self) -> RunHandle:
        """Start a run in the background of the running loop; return its handle at once."""
        check_not_importing()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise AeventorError(
                "Eventor.start() needs a running event loop; call it from async code, or "
                "use Eventor.run_sync() in a plain script"
            ) from None
        # Validate here, so that a bad program raises to the caller, not in the background.
        program = self.program
        distributed = self.mode == "distributed"
        # A standalone run lives in this process: if its task is cancelled, so is the run.
        state = _RunState(uuid.uuid4().hex, cancel_on_cancel=not distributed)
        state.cluster_key = self._key
        state.follows = distributed
        runner = self._run_distributed if distributed else self._run
        task = asyncio.create_task(runner(state, program), name=f"aeventor run {state.run_id}")
        self._started.add(task)
        task.add_done_callback(self._started.discard)
        return RunHandle(self.name, state, task)

    def attach(self, run_id: str) -> RunHandle:
        """A handle on an existing run of this store, through this Eventor's open store.

        .. versionadded:: 0.1
        """
        return attach(self, run_id)

    # -- distributed mode ---------------------------------------------------------------

    def _key(self) -> bytes:
        if self._cluster_key is None:
            self._cluster_key = load_cluster_key()
        return self._cluster_key

    def _check_shared_store(self, db: Database) -> None:
        if db.url.get_backend_name() == "sqlite":
            raise ConfigurationError(
                f"mode='distributed' needs a store every host shares (Postgres or MySQL); "
                f"{db!r} is a sqlite file. Pass store='postgresql+asyncpg://...' or a named store"
            )

    async def submit(self) -> str:
        """Submit a run to the agents of its hosts and return its id at once.

        The program is registered (signed with the cluster key), the run created and its
        initial events fired; the caller may exit, the agents carry the run to its end.
        Follow it with :func:`aeventor.attach` or ``aeventor show``.

        .. versionadded:: 0.1
        """
        check_not_importing()
        if self.mode != "distributed":
            raise ConfigurationError(
                "Eventor.submit() is for mode='distributed'; in standalone mode use run()"
            )
        program = self.program
        key = self._key()
        async with self._run_store() as db:
            self._check_shared_store(db)
            return await submit(db, program, list(self._triggers), key=key)

    @contextlib.asynccontextmanager
    async def _run_store(self) -> AsyncIterator[Database]:
        """The store for one run or handle. Unless held open by ``async with``, it is
        closed when the last run or handle using it ends."""
        self._live += 1
        try:
            yield await self._open()
        finally:
            self._live -= 1
            if not self._held and not self._live:
                await self.close()

    async def _run_distributed(self, state: _RunState, program: ProgramDef) -> RunResult:
        key = self._key()
        async with self._run_store() as db:
            self._check_shared_store(db)
            await submit(db, program, list(self._triggers), key=key, run_id=state.run_id)
            return await _follow(db, state)

    def run_sync(self) -> RunResult:
        """Run the program from plain (non-async) code: ``asyncio.run(ev.run())``, then close."""
        check_not_importing()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise AeventorError(
                "Eventor.run_sync() was called inside a running event loop; use "
                "`await ev.run()` or `ev.start()` there"
            )

        async def _main() -> RunResult:
            try:
                return await self.run()
            finally:
                if not self._live:
                    await self.close()

        return asyncio.run(_main())

    async def _run(
        self, state: _RunState, program: ProgramDef, begin: _Begin | None = None
    ) -> RunResult:
        """A standalone run: a worker scoped to the run, in this process."""
        graph = Graph(program)
        executor = LocalExecutor()
        if any(step.executor == "warm" for step in program.steps.values()):
            # The zygote starts while the store opens and the run is created.
            executor.prestart()
        try:
            async with self._run_store() as db:
                with drain_on_sigterm(state.stop):
                    return await self._drive(db, state, graph, executor, begin or self._create)
        finally:
            state.worker = None
            await executor.aclose()

    async def _create(
        self, db: Database, state: _RunState, graph: Graph, worker: Worker, run_log: RunLog
    ) -> Advance:
        """Begin a new run: register the program, create the run, fire its initial events."""
        program = graph.program
        program_id = await db.register_program(program)
        log_dir = await asyncio.to_thread(self.log_dir.resolve)  # reads the file system
        run_log.run_started(program.name)
        for event, sequence in self._triggers:
            run_log.event(event, sequence)
        _, advance = await db.create_run(
            graph,
            program_id=program_id,
            triggers=list(self._triggers),
            run_id=state.run_id,
            take=worker.taker(),
            controller=worker.id,
            log_dir=str(log_dir),
        )
        return advance

    async def _drive(
        self,
        db: Database,
        state: _RunState,
        graph: Graph,
        executor: LocalExecutor,
        begin: _Begin,
    ) -> RunResult:
        program = graph.program
        worker = Worker(
            store=db,
            scope=Scope(run_id=state.run_id),
            config=WorkerConfig(
                concurrency=self.max_concurrency,
                lease=self.lease,
                grace=self.grace,
                log_dir=state.log_dir or self.log_dir,
                deterministic_logs=self.deterministic_logs,
                log_level=self.level,
                until_idle=state.until_idle,
            ),
            programs=OwnProgram(graph),
            route=functools.partial(_route, executor, inloop_as_process=state.inloop_as_process),
            funcs=state.funcs if state.funcs is not None else self._funcs,
            on_status=state.set_status,
        )
        run_log = worker.run_log(program, state.run_id)
        begun = False
        try:
            advance = await begin(db, state, graph, worker, run_log)
            begun = True
            state.store, state.graph, state.worker = db, graph, worker
            state.created.set()
            worker.apply(state.run_id, advance)
            await worker.run(state.stop)
            if worker.status is RunStatus.running and worker.idle:
                # aeventor continue: nothing more is due now; a later one goes on.
                run_log.info(f"run {state.run_id} continued: nothing more is due now")
                await run_log.flush()
                state.final = await db.load_result(state.run_id)
                return state.final
            if worker.status is RunStatus.running:
                # Stopped (SIGTERM) before the run ended: its steps were drained.
                reason = f"terminated by SIGTERM (running steps got {self.grace:g}s to finish)"
                await asyncio.shield(_finish_cancelled(db, state, run_log, reason))
                return _final(state)
        except BaseException as exc:
            if not begun and isinstance(exc, RecoveryRefused | ConfigurationError | NoResult):
                raise  # refused before anything changed: nothing to cancel
            reason = (
                "cancelled" if isinstance(exc, asyncio.CancelledError) else f"engine error: {exc!r}"
            )
            await asyncio.shield(_finish_cancelled(db, state, run_log, reason))
            raise
        run_log.run_ended(worker.status.value)
        await run_log.end(db)
        result = dataclasses.replace(
            await db.load_result(state.run_id), log_dir=run_log.path.parent
        )
        state.final = result
        return result

    # -- recovery -------------------------------------------------------------------------

    async def _recover(
        self,
        run_id: str,
        *,
        force: bool,
        program: ProgramDef | None,
        rerun: tuple[str, str | None] | None = None,
    ) -> RunResult:
        """Recover an earlier run (or, with ``rerun=(step, sequence)``, run one of its step
        runs and what follows it again) and drive it to its end.

        ``program`` None recovers with the definition stored with the run (the command
        line, :func:`aeventor.recover`); in-loop steps then run in the step runner, as
        agents run them. The checks come first and change nothing: the run exists, the
        program is its version (or ``force``), its controller and workers are gone.
        """
        from .liveness import abandoned
        from .queries import run_result
        from .signing import program_signature, run_signature

        async with self._run_store() as db:
            found = await run_result(db, run_id)
            run_id = found.run_id
            origin = await db.run_origin(run_id)
            stored = await db.stored_program(origin.program_id)
            own = ProgramDef.from_json(json.loads(stored.definition))
            distributed = origin.mode == "distributed"
            switch: tuple[int, str | None] | None = None
            if program is None:
                program = own
                latest = await db.latest_program(own.name)
                if latest.version != own.version and not force:
                    raise ProgramChanged(
                        f"program {own.name!r} changed since run {run_id} was made (the run "
                        f"is version {own.version[:8]}, the latest registered is "
                        f"{latest.version[:8]}): pass --force (force=True) to recover the run "
                        "with its own version, or recover from the changed script with "
                        f"`ev.run(recover={run_id[:8]!r}, force=True)` to use the new one"
                    )
                local = [s.name for s in own.steps.values() if s.local_only]
                if local and not distributed:
                    raise ConfigurationError(
                        f"run {run_id}: step(s) {', '.join(local)} run callables that only "
                        "the script that defined them has (closures or lambdas); recover "
                        f"from that script with `ev.run(recover={run_id[:8]!r})`"
                    )
            elif program.name != own.name:
                raise ConfigurationError(
                    f"run {run_id} is a run of program {own.name!r}, not {program.name!r}"
                )
            elif program.version != own.version:
                if not force:
                    raise ProgramChanged(
                        f"program {own.name!r} changed since run {run_id} was made (the run "
                        f"is version {own.version[:8]}, this program is {program.version[:8]}):"
                        " recovering it with the new definition may rerun or skip other steps"
                        " than the run expects; pass force=True (--force) to do so anyway, or"
                        f" recover with the run's own definition: `aeventor recover {run_id[:8]}`"
                    )
                if distributed:
                    key = self._key()
                    new_id = await db.register_program(
                        program, signature=program_signature(key, program)
                    )
                    switch = (
                        new_id,
                        run_signature(
                            key, run_id=run_id, program_id=new_id, version=program.version
                        ),
                    )
                else:
                    switch = (await db.register_program(program), None)
            target: tuple[str, str] | None = None
            if rerun is not None:
                target = _rerun_target(found, program, *rerun)
            dead: frozenset[str] = frozenset()
            if found.status is RunStatus.running:
                _, dead = await abandoned(db, run_id)
            generation = found.recovery
            if distributed:
                graph = Graph(program, signer=step_run_signer(self._key()))
                recovery = await db.recover(
                    graph,
                    run_id,
                    generation=generation,
                    dead=dead,
                    rerun=target,
                    program=switch,
                )
                state = _RunState(run_id, cancel_on_cancel=True)
                state.follows = True
                log.info("run.recovered", run_id=run_id, recovery=recovery.recovery)
                return await _follow(db, state)
        state = _RunState(run_id, cancel_on_cancel=True)
        if found.log_dir is not None:
            # One run's logs stay in one directory, whoever recovers it.
            state.log_dir = found.log_dir.parent.parent
        if program is own:
            state.funcs, state.inloop_as_process = {}, True

        async def begin(
            db: Database, state: _RunState, graph: Graph, worker: Worker, run_log: RunLog
        ) -> Advance:
            recovery = await db.recover(
                graph,
                run_id,
                generation=generation,
                dead=dead,
                rerun=target,
                take=worker.taker(),
                controller=worker.id,
                program=switch,
            )
            again = ", ".join(f"{step}[{sequence}]" for step, sequence in recovery.rerun)
            what = "recovery" if target is None else "rerun"
            run_log.info(f"run {run_id} {what} {recovery.recovery} started: running {again}")
            return recovery.advance

        return await self._run(state, program, begin)


async def _continue_run(eventor: Eventor, run_id: str) -> RunResult:
    """Continue a standalone run in its generation: take it over from its dead (or
    stopped) controller, act on what is due now (ready step runs, due delays and retries,
    and what they cause), and return, the run still running if more is due later."""
    from .liveness import abandoned
    from .queries import run_result

    async with eventor._run_store() as db:
        found = await run_result(db, run_id)
        run_id = found.run_id
        if found.status is not RunStatus.running:
            raise NothingToRecover(
                f"run {run_id} has ended ({found.status.value}): nothing to continue; "
                f"`aeventor recover {run_id[:8]}` runs what did not succeed again"
            )
        origin = await db.run_origin(run_id)
        if origin.mode == "distributed":
            raise ConfigurationError(
                f"run {run_id} is distributed: its agents continue it (they reach its delays "
                "when due); `aeventor recover` reruns what its dead agents left"
            )
        program = await db.run_program(run_id)
        workers, _ = await abandoned(db, run_id)
        if workers.holders:
            raise RunStillRunning(
                f"run {run_id}: its dead controller left step runs running; "
                f"`aeventor recover {run_id[:8]}` runs them again"
            )
    state = _RunState(run_id, cancel_on_cancel=True)
    if found.log_dir is not None:
        state.log_dir = found.log_dir.parent.parent
    state.funcs, state.inloop_as_process, state.until_idle = {}, True, True
    expected = workers.controller

    async def begin(
        db: Database, state: _RunState, graph: Graph, worker: Worker, run_log: RunLog
    ) -> Advance:
        advance = await db.take_over(run_id, expected=expected, controller=worker.id)
        if not advance.recorded:
            raise NothingToRecover(f"run {run_id} ended meanwhile: nothing to continue")
        run_log.info(f"run {run_id} continued")
        return advance

    return await eventor._run(state, program, begin)


def _rerun_target(
    found: RunResult, program: ProgramDef, step: str, sequence: str | None
) -> tuple[str, str]:
    """The ``(step, sequence)`` a rerun names; the sequence may be left out when the step
    ran for one sequence only."""
    if step not in program.steps:
        raise ConfigurationError(
            f"rerun: program {program.name!r} has no step {step!r}; its steps: "
            + ", ".join(sorted(program.steps))
        )
    sequences = list(dict.fromkeys(s.sequence for s in found.steps if s.step == step))
    if sequence is not None:
        if str(sequence) not in sequences:
            raise ConfigurationError(
                f"rerun: step {step!r} has no run for sequence {sequence!r} in run "
                f"{found.run_id}; it ran for: {', '.join(sequences) or 'no sequence'}"
            )
        return step, str(sequence)
    if len(sequences) != 1:
        raise ConfigurationError(
            f"rerun: step {step!r} "
            + (
                f"ran for several sequences in run {found.run_id} ({', '.join(sequences)}); "
                "name one with --sequence"
                if sequences
                else f"never ran in run {found.run_id}"
            )
        )
    return step, sequences[0]


#: How a standalone run begins: create it, or recover it (see Eventor._create/_recover).
_Begin = Callable[[Database, "_RunState", Graph, Worker, RunLog], Awaitable[Advance]]


def _route(
    executor: LocalExecutor, step: StepDef, *, inloop_as_process: bool
) -> tuple[LocalExecutor, StepDef]:
    if inloop_as_process and step.executor == "inloop":
        # No callables of the defining process: the step runner imports and awaits it (in a
        # process forked by the warm pool).
        step = dataclasses.replace(step, executor="warm")
    return executor, step


class _RunState:
    """What a run shares with its handle."""

    def __init__(self, run_id: str, *, cancel_on_cancel: bool) -> None:
        self.run_id = run_id
        self.status = RunStatus.running
        self.final: RunResult | None = None
        #: Cancelling the run's task cancels the run (a run of this process, or `run()`).
        self.cancel_on_cancel = cancel_on_cancel
        #: The handle's cancel() was called (``cancel_event`` is set too).
        self.cancel_requested = False
        self.cancel_event = asyncio.Event()
        #: The run is followed (agents drive it): cancel() acts through ``cancel_event``.
        self.follows = False
        #: Set once the run exists in the store (and ``store`` is set).
        self.created = asyncio.Event()
        #: Set to drain the run's worker (SIGTERM).
        self.stop = asyncio.Event()
        self.store: Database | None = None
        self.graph: Graph | None = None
        #: The worker driving a standalone run, while it does.
        self.worker: Worker | None = None
        #: Where the cluster key comes from, to sign the step runs that events triggered
        #: into a distributed run make ready (agents run no others).
        self.cluster_key: Callable[[], bytes] | None = None
        #: A recovery's: the callables of in-loop steps (None: the Eventor's), the run's
        #: log directory, and whether in-loop steps run in the step runner (no callables:
        #: recovered from the stored definition, as agents run them).
        self.funcs: Mapping[str, Callable[..., Any]] | None = None
        self.log_dir: Path | None = None
        self.inloop_as_process = False
        #: Return once nothing of the run runs or is due now (``aeventor continue``).
        self.until_idle = False

    def set_status(self, status: RunStatus) -> None:
        self.status = status


def _final(state: _RunState) -> RunResult:
    assert state.final is not None
    return state.final


async def _finish_cancelled(
    db: Database, state: _RunState, run_log: RunLog | None, reason: str
) -> None:
    try:
        await db.cancel_run(state.run_id, reason=reason)
    except NoResult:
        return  # stopped before the run was written: nothing to record
    state.set_status(RunStatus.cancelled)
    result = await db.load_result(state.run_id)
    if run_log is not None:
        run_log.run_ended(f"cancelled ({reason})")
        await run_log.end(db)
        result = dataclasses.replace(result, log_dir=run_log.path.parent)
    state.final = result


async def _follow(db: Database, state: _RunState) -> RunResult:
    """Follow a run driven by others (agents) to its end.

    :meth:`RunHandle.cancel` cancels the run for every host. Cancelling the following task
    only stops following, unless the caller awaited :meth:`Eventor.run` (its run).
    """
    state.store = db
    state.created.set()
    following = asyncio.ensure_future(follow(db, state.run_id))
    cancelling = asyncio.ensure_future(state.cancel_event.wait())
    try:
        await asyncio.wait({following, cancelling}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if state.cancel_on_cancel:
            await asyncio.shield(_finish_cancelled(db, state, None, "cancelled"))
        raise
    finally:
        if not following.done():
            following.cancel()
        cancelling.cancel()
        await asyncio.gather(following, cancelling, return_exceptions=True)
    if not following.cancelled() and following.done():
        result = following.result()
    else:
        await asyncio.shield(_finish_cancelled(db, state, None, "cancelled"))
        result = _final(state)
    state.set_status(result.status)
    state.final = result
    return result


class RunHandle:
    """A run started with :meth:`Eventor.start`, or attached with :func:`attach`.

    .. versionadded:: 0.1
    """

    def __init__(self, program: str, state: _RunState, task: asyncio.Task[RunResult]) -> None:
        self._program = program
        self._state = state
        self._task = task
        task.add_done_callback(self._observe)

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id} {self.status.value}>"

    @property
    def run_id(self) -> str:
        return self._state.run_id

    @property
    def status(self) -> RunStatus:
        """The run's status as this process last saw it (live while it runs)."""
        return self._state.status

    def done(self) -> bool:
        return self._task.done()

    async def wait(self) -> RunResult:
        """Wait for the run to end and return its result (also after :meth:`cancel`).

        Giving up on the wait (a timeout, a cancelled caller) leaves the run alone.

        Raises:
            AeventorError: the engine failed; the cause is chained.
        """
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled() and self._state.final is not None:
                return self._state.final
            raise

    def cancel(self) -> None:
        """Cancel the run: its running steps are terminated (on every host) and it is
        recorded as cancelled. :meth:`wait` returns the cancelled result."""
        self._state.cancel_requested = True
        self._state.cancel_event.set()
        if not self._state.follows:
            self._task.cancel()

    async def trigger_event(self, event: Event | str, sequence: str | int = 0) -> None:
        """Fire ``event`` for ``sequence`` in the live run (waits until the run exists).

        Raises:
            ProgramDefinitionError: the run's program has no such event.
            AeventorError: the run has ended.
        """
        name = name_of(event)
        state = self._state
        db, graph = await self._live_store(f"trigger {name!r}")
        if name not in graph.program.events:
            raise ProgramDefinitionError(f"trigger_event: undefined event {name!r}")
        worker = state.worker
        if worker is not None:
            advance = await worker.trigger(graph, self.run_id, name, str(sequence))
        else:
            advance = await db.trigger(
                graph, run_id=self.run_id, event=name, sequence=str(sequence)
            )
        if not advance.recorded:
            raise AeventorError(
                f"run {self.run_id} has ended ({advance.run_status.value}); cannot trigger {name!r}"
            )

    async def cancel_step(
        self, step: Step | str, sequence: str | int = 0, *, reason: str = "cancelled"
    ) -> None:
        """Cancel the ready or running step run of ``step`` for ``sequence``.

        It is recorded ``cancelled`` and terminated (its whole process group; on an agent's
        host at the agent's next heartbeat). The run reacts as to a failure of the step: its
        failure triggers fire, and without one the run stops (running steps finish).

        Raises:
            ProgramDefinitionError: the run's program has no such step.
            NoResult: the step has no ready or running step run for ``sequence``.
            AeventorError: the run has ended.

        .. versionadded:: 0.1
        """
        name, seq = name_of(step), str(sequence)
        db, graph = await self._live_store(f"cancel step {name!r}")
        if name not in graph.program.steps:
            raise ProgramDefinitionError(f"cancel_step: the program has no step {name!r}")
        worker = self._state.worker
        held = None if worker is None else worker.holding(self.run_id, name, seq)
        advance = await db.cancel_step(graph, self.run_id, name, seq, reason=reason)
        if advance.recorded:
            if worker is not None:
                if held is not None:
                    worker.revoke(held)  # here: at once, not at the next heartbeat
                worker.apply(self.run_id, advance)
            return
        if advance.run_status is not RunStatus.running:
            raise AeventorError(
                f"run {self.run_id} has ended ({advance.run_status.value}); "
                f"cannot cancel step {name!r}"
            )
        raise NoResult(f"run {self.run_id}: step {name}[{seq}] is neither ready nor running")

    async def _live_store(self, what: str) -> tuple[Database, Graph]:
        """The store and program graph of the live run (waits until the run exists)."""
        state = self._state
        if not state.created.is_set() and not self._task.done():
            created = asyncio.ensure_future(state.created.wait())
            try:
                await asyncio.wait({created, self._task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                created.cancel()
                await asyncio.gather(created, return_exceptions=True)
        db = state.store
        if self._task.done() or db is None:
            raise AeventorError(f"run {self.run_id} has ended ({self.status.value}); cannot {what}")
        graph = state.graph
        if graph is None:
            program = await db.run_program(self.run_id)
            signer = None
            if state.cluster_key is not None and state.follows:
                origin = await db.run_origin(self.run_id)
                if origin.mode == "distributed":
                    signer = step_run_signer(state.cluster_key())
            graph = state.graph = Graph(program, signer=signer)
        return db, graph

    def _observe(self, task: asyncio.Task[RunResult]) -> None:
        if task.cancelled():
            if self._state.final is None:
                # Cancelled before the run was written to the store: nothing ran.
                now = datetime.now(UTC)
                self._state.final = RunResult(
                    run_id=self.run_id,
                    program=self._program,
                    status=RunStatus.cancelled,
                    reason="cancelled before it started",
                    created=now,
                    ended=now,
                    steps=(),
                )
                self._state.set_status(RunStatus.cancelled)
        elif task.exception() is not None:
            log.error("run failed", run_id=self.run_id, exc_info=task.exception())


def attach(
    store: str | URL | Path | Eventor, run_id: str, *, poll_interval: float | None = None
) -> RunHandle:
    """A handle on a run that already exists, from any process that reaches its store.

    ``await handle.wait()`` follows it to its end (giving up on the wait leaves the run
    alone); ``handle.cancel()`` cancels it for every host (the agents terminate its running
    steps); ``trigger_event`` fires into it. Pass an :class:`Eventor` (``async with``-opened,
    or any) to reuse its store for every handle instead of opening one per call.

    .. versionadded:: 0.1
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise AeventorError(
            "attach() needs a running event loop; call it from async code"
        ) from None
    state = _RunState(run_id, cancel_on_cancel=False)
    state.follows = True
    eventor = (
        store
        if isinstance(store, Eventor)
        else Eventor(name="attached", store=store, poll_interval=poll_interval)
    )
    state.cluster_key = eventor._key

    async def follow_it() -> RunResult:
        async with eventor._run_store() as db:
            return await _follow(db, state)

    task = asyncio.create_task(follow_it(), name=f"aeventor follow {run_id}")
    return RunHandle(eventor.name, state, task)
