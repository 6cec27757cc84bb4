"""Retries through tenacity (:func:`aeventor.utils.backoff`): store operations, the Postgres
listener, SSH connects, sqlite WAL.

No test waits for a real back-off: every retrier takes an injected ``sleep`` (here one that
records the delays and returns), and deadlines are measured on injected clocks. No sockets:
connections are fakes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import asyncssh
import pytest
import structlog

from aeventor.backends.executors import ssh
from aeventor.backends.stores import base, open_store
from aeventor.backends.stores.base import retry_transient
from aeventor.backends.stores.pg_listener import PgListener
from aeventor.exceptions import ConnectionLost, DatabaseError, HostUnreachable
from aeventor.logs import get_logger
from aeventor.utils import backoff

ATTEMPTS = 1000


class Sleeps:
    """An injectable ``sleep`` that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _full_jitter(delays: list[float], *, initial: float, maximum: float) -> bool:
    """Whether each delay lies in its full-jitter window, ``[0, min(maximum, initial * 2**n)]``."""
    return all(0 <= d <= min(maximum, initial * 2**n) for n, d in enumerate(delays))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """What :func:`retry_transient` needs of a store."""

    def __init__(self, operation: Callable[[FakeStore], Any], *, deadline: float) -> None:
        self.clock = FakeClock()
        self.sleep = Sleeps()
        self.reconnect_deadline = deadline
        self.operation = operation
        self.calls = 0

    @retry_transient
    async def work(self) -> Any:
        self.calls += 1
        return await self.operation(self)


def _store_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aeventor.store"]


# -- the shared policy ------------------------------------------------------------------


async def test_backoff_delays_are_full_jitter_capped() -> None:
    sleeps = Sleeps()
    failures = 0

    async def flaky() -> str:
        nonlocal failures
        failures += 1
        if failures <= 12:
            raise ConnectionLost("down")
        return "up"

    retrying = backoff(
        initial=0.5,
        maximum=4.0,
        stop=lambda _state: False,
        retry_on=lambda exc: isinstance(exc, ConnectionLost),
        sleep=sleeps,
        log=get_logger("aeventor.test"),
        event="test.retry",
    )
    async for attempt in retrying:
        with attempt:
            assert await flaky() == "up"
    assert len(sleeps.delays) == 12
    assert _full_jitter(sleeps.delays, initial=0.5, maximum=4.0)


# -- store operations ---------------------------------------------------------------------


async def test_store_operation_retries_then_succeeds_printing_nothing(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    async def flaky(store: FakeStore) -> str:
        if store.calls <= 2:
            raise ConnectionLost(f"lost #{store.calls}")
        return "done"

    store = FakeStore(flaky, deadline=120.0)
    assert await store.work() == "done"  # type: ignore[call-arg]

    assert store.calls == 3
    assert len(store.sleep.delays) == 2
    assert _full_jitter(
        store.sleep.delays, initial=base.RECONNECT_INITIAL_DELAY, maximum=base.RECONNECT_MAX_DELAY
    )
    warnings = _store_warnings(caplog)
    assert [(r.levelno, r.event, r.fields) for r in warnings] == [  # type: ignore[attr-defined]
        (
            logging.WARNING,
            "store unreachable; retrying",
            {"operation": "work", "attempt": n, "delay": round(delay, 3), "error": f"lost #{n}"},
        )
        for n, delay in zip((1, 2), store.sleep.delays, strict=True)
    ]
    assert capsys.readouterr().out == ""


async def test_unconfigured_store_retry_prints_nothing_to_stdout(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's promise: the library prints nothing, whatever (nothing) is configured.

    No :mod:`logging` configuration and structlog at its defaults (the autouse fixture resets
    it), where structlog's default logger would print to stdout: the warning still goes to
    the standard library logger ``aeventor.store`` only.
    """
    assert not structlog.is_configured()
    assert logging.getLogger("aeventor").handlers == []

    async def flaky(store: FakeStore) -> str:
        if store.calls == 1:
            raise ConnectionLost("server closed the connection")
        return "done"

    store = FakeStore(flaky, deadline=120.0)
    assert await store.work() == "done"  # type: ignore[call-arg]

    assert [(r.name, r.levelno) for r in caplog.records] == [("aeventor.store", logging.WARNING)]
    assert capsys.readouterr().out == ""


async def test_store_operation_gives_up_after_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def down(store: FakeStore) -> None:
        store.clock.now += 1.0  # each attempt takes a second
        raise ConnectionLost(f"still down at {store.clock.now}")

    store = FakeStore(down, deadline=5.0)
    with pytest.raises(ConnectionLost) as info:
        await store.work()  # type: ignore[call-arg]

    assert store.calls == 5
    assert str(info.value) == "still down at 5.0"
    assert len(_store_warnings(caplog)) == 4
    assert len(store.sleep.delays) == 4


async def test_store_operation_without_deadline_tries_once() -> None:
    async def down(store: FakeStore) -> None:
        raise ConnectionLost("down")

    store = FakeStore(down, deadline=0)
    with pytest.raises(ConnectionLost):
        await store.work()  # type: ignore[call-arg]
    assert store.calls == 1
    assert store.sleep.delays == []


async def test_other_errors_are_not_retried() -> None:
    async def broken(store: FakeStore) -> None:
        raise DatabaseError("syntax error")

    store = FakeStore(broken, deadline=120.0)
    with pytest.raises(DatabaseError):
        await store.work()  # type: ignore[call-arg]
    assert store.calls == 1
    assert store.sleep.delays == []


async def test_a_cancelled_caller_lets_the_attempt_finish_and_is_not_retried() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def slow(store: FakeStore) -> None:
        started.set()
        await release.wait()
        finished.append("attempt")
        raise ConnectionLost("lost while cancelled")

    store = FakeStore(slow, deadline=120.0)
    task = asyncio.create_task(store.work())  # type: ignore[call-arg]
    await started.wait()
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # still waiting for its attempt
    release.set()
    await asyncio.wait([task])
    assert task.cancelled()
    assert finished == ["attempt"]
    assert store.calls == 1
    assert store.sleep.delays == []


async def test_a_caller_cancelled_during_the_delay_is_not_retried() -> None:
    sleeping = asyncio.Event()

    async def held(_delay: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    async def down(store: FakeStore) -> None:
        raise ConnectionLost("down")

    store = FakeStore(down, deadline=120.0)
    store.sleep = held  # type: ignore[assignment]
    task = asyncio.create_task(store.work())  # type: ignore[call-arg]
    await sleeping.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert store.calls == 1


# -- the Postgres listener (fake connections) ---------------------------------------------


class FakeConnection:
    def __init__(self) -> None:
        self.on_terminate: list[Callable[[Any], None]] = []
        self.closed = False

    def add_termination_listener(self, callback: Callable[[Any], None]) -> None:
        self.on_terminate.append(callback)

    async def add_listener(self, channel: str, callback: Any) -> None:
        pass

    def is_closed(self) -> bool:
        return self.closed

    async def fetchval(self, query: str) -> int:
        return 1

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - asyncpg's signature
        self.closed = True

    def terminate(self) -> None:
        self.closed = True

    def drop(self) -> None:
        """The server closed the connection."""
        self.closed = True
        for callback in self.on_terminate:
            callback(self)


class FlakyServer:
    """Refuses the first ``refusals`` connects (quoting the DSN, as drivers may)."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls = 0
        self.connections: list[FakeConnection] = []
        self.connected = asyncio.Condition()
        self.called = asyncio.Event()

    async def connect(self, dsn: str) -> FakeConnection:
        self.calls += 1
        self.called.set()
        if self.calls <= self.refusals:
            raise ConnectionRefusedError(f"could not reach {dsn}")
        conn = FakeConnection()
        async with self.connected:
            self.connections.append(conn)
            self.connected.notify_all()
        return conn

    async def wait_connections(self, n: int) -> FakeConnection:
        async with asyncio.timeout(10), self.connected:
            await self.connected.wait_for(lambda: len(self.connections) >= n)
        return self.connections[n - 1]


def _listener(server: FlakyServer, **kwargs: Any) -> PgListener:
    return PgListener(
        dsn="postgresql://postgres:hunter2@127.0.0.1/test",
        channels=["jobs"],
        on_notify=lambda channel, payload: None,
        connect=server.connect,
        **{"sleep": Sleeps(), **kwargs},
    )


def _listener_events(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, dict[str, Any]]]:
    return [
        (r.levelno, r.event, r.fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "aeventor.pg_listener"
    ]


async def test_listener_backoff_grows_then_starts_over_after_a_connect(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="aeventor.pg_listener")
    server = FlakyServer(refusals=3)
    sleeps = Sleeps()
    listener = _listener(server, backoff_initial=0.5, backoff_max=1.0, sleep=sleeps)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.run())
        first = await server.wait_connections(1)
        first.drop()
        await server.wait_connections(2)
        assert listener.reconnects == 1
        task.cancel()

    events = _listener_events(caplog)
    backoffs = [
        (fields["attempt"], fields["delay"])
        for _, event, fields in events
        if event == "pg_listener.backoff"
    ]
    # Three refusals (attempts 1-3), then the loss: a fresh back-off from attempt 1.
    assert [attempt for attempt, _ in backoffs] == [1, 2, 3, 1]
    assert [delay for _, delay in backoffs] == [round(d, 3) for d in sleeps.delays]
    assert _full_jitter(sleeps.delays[:3], initial=0.5, maximum=1.0)
    assert sleeps.delays[3] <= 0.5
    warnings = [(event, fields.get("attempt")) for level, event, fields in events if level >= 30]
    assert warnings == [
        ("pg_listener.connect_failed", 1),
        ("pg_listener.connect_failed", 2),
        ("pg_listener.connect_failed", 3),
        ("pg_listener.connection_lost", None),
    ]
    # The password stays out of every record.
    assert "hunter2" not in caplog.text
    assert capsys.readouterr().out == ""


async def test_listener_cancelled_during_backoff_reraises() -> None:
    server = FlakyServer(refusals=ATTEMPTS)
    sleeping = asyncio.Event()

    async def held(_delay: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    listener = _listener(server, sleep=held)
    task = asyncio.create_task(listener.run())
    async with asyncio.timeout(10):
        await sleeping.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert server.calls == 1


# -- SSH connects --------------------------------------------------------------------------


def _executor(sleeps: Sleeps) -> tuple[ssh.SshExecutor, Any]:
    executor = ssh.SshExecutor(
        targets={"dead": ssh.SshTarget(host="127.0.0.5", port=2222)}, sleep=sleeps
    )
    return executor, executor._host("dead")


async def test_ssh_connect_retries_transient_errors_then_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def refuse(host: str, **options: Any) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(asyncssh, "connect", refuse)
    sleeps = Sleeps()
    executor, host = _executor(sleeps)
    with pytest.raises(HostUnreachable, match=r"host 'dead' \(127\.0\.0\.5:2222\)"):
        await executor._connect(host)
    assert calls == ssh.CONNECT_ATTEMPTS
    assert len(sleeps.delays) == ssh.CONNECT_ATTEMPTS - 1
    assert _full_jitter(sleeps.delays, initial=ssh.BACKOFF_BASE, maximum=ssh.BACKOFF_CAP)
    retried = [r for r in caplog.records if r.name == "aeventor.ssh"]
    assert [r.fields["attempt"] for r in retried] == list(  # type: ignore[attr-defined]
        range(1, ssh.CONNECT_ATTEMPTS)
    )
    assert all(r.fields["host"] == "dead" for r in retried)  # type: ignore[attr-defined]


async def test_ssh_connect_does_not_retry_a_refused_login(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    async def deny(host: str, **options: Any) -> None:
        nonlocal calls
        calls += 1
        raise asyncssh.PermissionDenied("no")

    monkeypatch.setattr(asyncssh, "connect", deny)
    sleeps = Sleeps()
    executor, host = _executor(sleeps)
    with pytest.raises(HostUnreachable):
        await executor._connect(host)
    assert calls == 1
    assert sleeps.delays == []


# -- sqlite: switching to WAL --------------------------------------------------------------


def _locked_pragma(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """Make ``PRAGMA journal_mode = WAL`` fail ``failures`` times as if another opener held it."""
    seen: list[str] = []
    execute = aiosqlite.Connection.execute

    def patched(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
        if sql.startswith("PRAGMA journal_mode") and len(seen) < failures:
            seen.append(sql)

            async def fail() -> None:
                raise sqlite3.OperationalError("database is locked")

            return fail()
        return execute(self, sql, *args)

    monkeypatch.setattr(aiosqlite.Connection, "execute", patched)
    return seen


async def test_wal_switch_retries_while_locked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = _locked_pragma(monkeypatch, failures=3)
    db = open_store(f"sqlite+aiosqlite:///{tmp_path}/s.db", program="p")
    db.sleep = sleeps = Sleeps()
    async with db, db.reading() as conn:
        mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
    assert len(seen) == 3
    assert mode == "wal"
    assert len(sleeps.delays) == 3
    assert _full_jitter(sleeps.delays, initial=0.01, maximum=0.2)


async def test_wal_switch_gives_up_after_the_busy_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _locked_pragma(monkeypatch, failures=ATTEMPTS)
    db = open_store(f"sqlite+aiosqlite:///{tmp_path}/s.db", program="p")
    db.sleep = Sleeps()
    clock = FakeClock()

    def ticking() -> float:
        clock.now += 5.0
        return clock.now

    db.clock = ticking
    with pytest.raises(DatabaseError, match="cannot switch to WAL: database is locked"):
        await db.open()
