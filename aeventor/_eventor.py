"""The public program API: :class:`Eventor`, its events and steps, and :class:`RunHandle`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import structlog
from sqlalchemy.engine import URL

from .backends.executors.local import LocalExecutor
from .backends.stores import open_store
from .backends.stores.base import Database
from .dispatch._state import Graph
from .dispatch.logs import RunLog, run_log_dir
from .dispatch.worker import RunDispatcher
from .exceptions import AeventorError, ConfigurationError, NoResult, ProgramDefinitionError
from .guard import check_not_importing
from .program.builder import (
    Event,
    Group,
    ProgramBuilder,
    Step,
    _check_name,
    _name_of,
)
from .program.model import EventDef, ProgramDef, RunStatus, StepDef, StepStatus
from .records import RunResult
from .signing import load_cluster_key
from .submission import follow, submit

__all__ = ("Event", "Eventor", "Group", "RunHandle", "Step", "attach")

log = structlog.get_logger("aeventor")


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
        logging_level: level of the program log (``logging.INFO`` by default).
        log_dir: where run logs go (default ``./aeventor_logs``).
        deterministic_logs: write logs without timestamps and pids, so runs can be diffed.
        stop_on_exception: a step failure that fires no failure trigger stops the run.
        max_concurrency: most step runs executing at once (default: no limit).
        poll_interval: seconds between polls for work made by other processes; the store's
            default when None (sqlite in standalone mode needs none).
        mode: ``"standalone"`` (this process runs every step) or ``"distributed"`` (the run is
            submitted to the store, and the agents of each step's host run the steps; the
            store must be shared: Postgres or MySQL).
        default_host: in distributed mode, the host of steps that name none (see the host
            rules in the README).
        cluster_key: the key that signs submitted programs (default: from
            ``$AEVENTOR_CLUSTER_KEY`` or the cluster key file).

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
        poll_interval: float | None = None,
        mode: str = "standalone",
        default_host: str | None = None,
        cluster_key: bytes | str | None = None,
    ) -> None:
        self.name = name if name is not None else _program_name()
        _check_name(self.name, "program")
        if mode not in ("standalone", "distributed"):
            raise ConfigurationError(
                f"mode={mode!r}: use 'standalone' (steps run here) or 'distributed' (steps run "
                "on their hosts' agents)"
            )
        if default_host is not None:
            _check_name(default_host, "default_host")
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
        self.max_concurrency = max_concurrency
        self.poll_interval = poll_interval
        self._builder = ProgramBuilder()
        self._db: Database | None = None
        self._opening: asyncio.Event | None = None
        self._owns_db = False
        self._live = 0

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
    ) -> Group:
        """Define a group of steps sharing properties.

        Args:
            host: the host of member steps that name none.
            env: environment variables of member steps (a step's own ``env`` wins).
            config: default step config of members (the keys :meth:`add_step` takes).

        .. versionadded:: 0.1
        """
        return self._builder.add_group(name, host=host, env=env, config=config)

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
    ) -> Step:
        """Define a step.

        Args:
            func: what the step runs; None makes a no-op that succeeds. A plain function
                runs in a subprocess that imports it by path (so it must be defined at
                module level); an ``async def`` runs in the engine's loop by default.
            args, kwargs: JSON-serialisable arguments.
            triggers: ``{StepStatus.success: (event, ...), ...}`` for the statuses ready,
                active, success, failure and complete (= success or failure).
            host: the host the step is assigned to (recorded; used in distributed mode).
            command: an argv to run instead of a function (exit code 0 is success).
            executor: ``"process"``, ``"inloop"`` or ``"command"`` to override the default.
            sequence_arg_name: pass the sequence to ``func`` as this keyword argument.
            config: the original eventor's per-step config keys ``task_construct``
                (``"process"`` or ``"invoke"``), ``executor`` and ``sequence_arg_name``.
            group: a group (see :meth:`add_group`) whose host, env and config apply.
            env: extra environment variables of the step.

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
        )

    def add_assoc(self, event: Event | str, *targets: Step | Event | str, delay: float = 0) -> None:
        """Make ``event`` fan out to steps and/or other events.

        Raises:
            ProgramDefinitionError: an unknown event or target, or a delay (durable delays
                are not implemented yet).
        """
        self._builder.add_assoc(event, *targets, delay=delay)

    def trigger_event(self, event: Event | str, sequence: str | int = 0) -> None:
        """Fire ``event`` for ``sequence`` when the next run starts (idempotent).

        To fire an event into a live run, use :meth:`RunHandle.trigger_event` or
        ``aeventor.current_step().trigger(...)`` from an in-loop step.
        """
        if self._live:
            raise AeventorError(
                f"trigger_event({_name_of(event)!r}) while a run is live: it would only apply "
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
        self._owns_db = False  # held open by the caller until __aexit__
        return self

    async def __aexit__(self, *exc: object) -> None:
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
        """Close the store (runs in progress must have ended)."""
        db, self._db = self._db, None
        self._owns_db = False
        if db is not None:
            await db.aclose()

    async def run(self) -> RunResult:
        """Run the program until nothing is pending and return the result.

        The result is truthy on success and falsy when a step failure that fired no failure
        trigger stopped the run. Cancelling the awaiting task terminates running steps and
        records the run as cancelled.
        """
        check_not_importing()
        if self.mode == "distributed":
            return await self._run_distributed(_RunState(uuid.uuid4().hex), self.program)
        return await self._run(_RunState(uuid.uuid4().hex), self.program)

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
        state = _RunState(uuid.uuid4().hex)
        runner = self._run_distributed if self.mode == "distributed" else self._run
        task = asyncio.create_task(runner(state, program), name=f"aeventor run {state.run_id}")
        return RunHandle(self, state, task)

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
        db = await self._open()
        self._check_shared_store(db)
        return await submit(db, program, list(self._triggers), key=key)

    @contextlib.asynccontextmanager
    async def _run_store(self) -> AsyncIterator[Database]:
        """The store for one run. Opened for runs (not held by ``async with``), it is closed
        by the last run to end."""
        if self._db is None:
            self._owns_db = True
        self._live += 1
        try:
            yield await self._open()
        finally:
            self._live -= 1
            if self._owns_db and not self._live:
                await self.close()

    async def _run_distributed(self, state: _RunState, program: ProgramDef) -> RunResult:
        key = self._key()
        async with self._run_store() as db:
            self._check_shared_store(db)
            await submit(db, program, list(self._triggers), key=key, run_id=state.run_id)
            return await self._follow(db, state)

    async def _follow(self, db: Database, state: _RunState) -> RunResult:
        """Follow a run driven by others to its end; cancelling cancels it for every host."""
        state.follower = db
        try:
            try:
                result = await follow(db, state.run_id)
            except asyncio.CancelledError:
                await asyncio.shield(self._finish_cancelled(db, state, None, "cancelled"))
                raise
            state.set_status(result.status)
            state.final = result
            return result
        finally:
            state.follower = None

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
                await self.close()

        return asyncio.run(_main())

    async def _run(self, state: _RunState, program: ProgramDef) -> RunResult:
        graph = Graph(program)
        run_dir = run_log_dir(self.log_dir, program.name, state.run_id)
        run_log = RunLog(
            run_dir / "program.log", level=self.level, deterministic=self.deterministic_logs
        )
        executor = LocalExecutor()
        try:
            async with self._run_store() as db:
                return await self._drive(db, state, graph, executor, run_dir, run_log)
        finally:
            state.dispatcher = None
            await executor.aclose()

    async def _drive(
        self,
        db: Database,
        state: _RunState,
        graph: Graph,
        executor: LocalExecutor,
        run_dir: Path,
        run_log: RunLog,
    ) -> RunResult:
        program = graph.program
        program_id = await db.register_program(program)
        run_log.info(f"run {state.run_id} of program {program.name} started")
        for event, sequence in self._triggers:
            run_log.info(f"event {event}[{sequence}] triggered")
        dispatcher = RunDispatcher(
            db=db,
            graph=graph,
            run_id=state.run_id,
            executor=executor,
            funcs=self._funcs,
            run_dir=run_dir,
            run_log=run_log,
            deterministic_logs=self.deterministic_logs,
            logger_name=f"{program.name}.step",
            max_concurrency=self.max_concurrency,
            on_status=state.set_status,
        )
        try:
            _, advance = await db.create_run(
                graph,
                program_id=program_id,
                triggers=list(self._triggers),
                run_id=state.run_id,
                take=dispatcher.taker(),
            )
            state.dispatcher = dispatcher
            dispatcher.apply(advance)
            status = await dispatcher.run()
        except BaseException as exc:
            reason = (
                "cancelled" if isinstance(exc, asyncio.CancelledError) else f"engine error: {exc!r}"
            )
            await asyncio.shield(self._finish_cancelled(db, state, run_log, reason))
            raise
        run_log.info(f"run {state.run_id} ended: {status.value}")
        await run_log.flush()
        result = dataclasses.replace(await db.load_result(state.run_id), log_dir=run_dir)
        state.final = result
        return result

    async def _finish_cancelled(
        self, db: Database, state: _RunState, run_log: RunLog | None, reason: str
    ) -> None:
        try:
            await db.cancel_run(state.run_id, reason=reason)
        except NoResult:
            return  # stopped before the run was written: nothing to record
        state.set_status(RunStatus.cancelled)
        result = await db.load_result(state.run_id)
        if run_log is not None:
            run_log.info(f"run {state.run_id} ended: cancelled ({reason})")
            await run_log.flush()
            result = dataclasses.replace(result, log_dir=run_log.path.parent)
        state.final = result


class _RunState:
    """What a run shares with its handle."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.status = RunStatus.running
        self.final: RunResult | None = None
        self.dispatcher: RunDispatcher | None = None
        #: The store a distributed run is followed through, while it is.
        self.follower: Database | None = None

    def set_status(self, status: RunStatus) -> None:
        self.status = status


class RunHandle:
    """A run started with :meth:`Eventor.start`.

    .. versionadded:: 0.1
    """

    def __init__(self, eventor: Eventor, state: _RunState, task: asyncio.Task[RunResult]) -> None:
        self._eventor = eventor
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
        """Stop the run: terminate its running steps and record it as cancelled."""
        self._task.cancel()

    async def trigger_event(self, event: Event | str, sequence: str | int = 0) -> None:
        """Fire ``event`` for ``sequence`` in the live run."""
        name = _name_of(event)
        dispatcher = self._state.dispatcher
        if dispatcher is not None:
            if name not in dispatcher.graph.program.events:
                raise ProgramDefinitionError(f"trigger_event: undefined event {name!r}")
            await dispatcher.trigger(name, str(sequence))
            return
        db = self._state.follower
        if db is None:
            raise AeventorError(f"run {self.run_id} is not live; cannot trigger {event!r}")
        program, _ = await db.run_provenance(self.run_id)
        if name not in program.events:
            raise ProgramDefinitionError(f"trigger_event: undefined event {name!r}")
        await db.trigger(Graph(program), run_id=self.run_id, event=name, sequence=str(sequence))

    def _observe(self, task: asyncio.Task[RunResult]) -> None:
        if task.cancelled():
            if self._state.final is None:
                # Cancelled before the run was written to the store: nothing ran.
                now = datetime.now(UTC)
                self._state.final = RunResult(
                    run_id=self.run_id,
                    program=self._eventor.name,
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
    store: str | URL | Path, run_id: str, *, poll_interval: float | None = None
) -> RunHandle:
    """A handle on a run that already exists, from any process that reaches its store.

    ``await handle.wait()`` follows it to its end; ``handle.cancel()`` cancels it for every
    host (the agents terminate its running steps); ``trigger_event`` fires into it.

    .. versionadded:: 0.1
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise AeventorError(
            "attach() needs a running event loop; call it from async code"
        ) from None
    state = _RunState(run_id)
    eventor = Eventor(name="attached", store=store, poll_interval=poll_interval)

    async def follow_it() -> RunResult:
        try:
            return await eventor._follow(await eventor._open(), state)
        finally:
            await eventor.close()

    task = asyncio.create_task(follow_it(), name=f"aeventor follow {run_id}")
    return RunHandle(eventor, state, task)
