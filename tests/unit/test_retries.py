"""Retries through stamina: store operations, the Postgres listener, SSH connects, sqlite WAL.

No test waits for a real back-off: ``stamina.set_testing`` takes the delays away (and sets
the attempts), and deadlines are measured on injected clocks. No sockets: connections are
fakes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import asyncssh
import pytest
import stamina
from stamina.instrumentation import LoggingOnRetryHook, set_on_retry_hooks

from aeventor.backends.executors import ssh
from aeventor.backends.stores import open_store
from aeventor.backends.stores.base import retry_on_disconnect
from aeventor.backends.stores.pg_listener import PgListener
from aeventor.exceptions import ConnectionLost, DatabaseError, HostUnreachable

ATTEMPTS = 1000


@pytest.fixture(autouse=True)
def _stamina_through_logging() -> Iterator[None]:
    """What an application that configures only :mod:`logging` does with stamina.

    stamina reports each scheduled retry itself, through structlog when it is installed;
    unconfigured structlog prints to stdout. aeventor leaves that global choice to the
    program (the agent routes structlog to logging), so these tests make it too.
    """
    set_on_retry_hooks([LoggingOnRetryHook])
    yield
    set_on_retry_hooks(None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """What :func:`retry_on_disconnect` needs of a store."""

    def __init__(self, operation: Callable[[FakeStore], Any], *, deadline: float) -> None:
        self.clock = FakeClock()
        self.reconnect_deadline = deadline
        self.operation = operation
        self.calls = 0

    @retry_on_disconnect
    async def work(self) -> Any:
        self.calls += 1
        return await self.operation(self)


def _store_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aeventor.store"]


# -- store operations ---------------------------------------------------------------------


async def test_store_operation_retries_then_succeeds_printing_nothing(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    async def flaky(store: FakeStore) -> str:
        if store.calls <= 2:
            raise ConnectionLost(f"lost #{store.calls}")
        return "done"

    store = FakeStore(flaky, deadline=120.0)
    with stamina.set_testing(True, attempts=ATTEMPTS):
        assert await store.work() == "done"  # type: ignore[call-arg]

    assert store.calls == 3
    warnings = _store_warnings(caplog)
    assert [(r.levelno, r.event, r.fields) for r in warnings] == [  # type: ignore[attr-defined]
        (
            logging.WARNING,
            "store unreachable; retrying",
            {"operation": "work", "attempt": n, "error": f"lost #{n}"},
        )
        for n in (1, 2)
    ]
    assert capsys.readouterr().out == ""


async def test_store_operation_gives_up_after_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def down(store: FakeStore) -> None:
        store.clock.now += 1.0  # each attempt takes a second
        raise ConnectionLost(f"still down at {store.clock.now}")

    store = FakeStore(down, deadline=5.0)
    with stamina.set_testing(True, attempts=ATTEMPTS), pytest.raises(ConnectionLost) as info:
        await store.work()  # type: ignore[call-arg]

    assert store.calls == 5
    assert str(info.value) == "still down at 5.0"
    assert len(_store_warnings(caplog)) == 4


async def test_store_operation_without_deadline_tries_once() -> None:
    async def down(store: FakeStore) -> None:
        raise ConnectionLost("down")

    store = FakeStore(down, deadline=0)
    with pytest.raises(ConnectionLost):
        await store.work()  # type: ignore[call-arg]
    assert store.calls == 1


async def test_other_errors_are_not_retried() -> None:
    async def broken(store: FakeStore) -> None:
        raise DatabaseError("syntax error")

    store = FakeStore(broken, deadline=120.0)
    with stamina.set_testing(True, attempts=ATTEMPTS), pytest.raises(DatabaseError):
        await store.work()  # type: ignore[call-arg]
    assert store.calls == 1


async def test_a_cancelled_caller_lets_the_attempt_finish_and_is_not_retried() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def slow(store: FakeStore) -> None:
        started.set()
        await release.wait()
        finished.append("attempt")
        raise ConnectionLost("lost while cancelled")

    store = FakeStore(slow, deadline=120.0)
    with stamina.set_testing(True, attempts=ATTEMPTS):
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
        **kwargs,
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
    listener = _listener(server)
    with stamina.set_testing(True, attempts=ATTEMPTS):
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(listener.run())
            first = await server.wait_connections(1)
            first.drop()
            await server.wait_connections(2)
            assert listener.reconnects == 1
            task.cancel()

    events = _listener_events(caplog)
    backoffs = [fields["attempt"] for _, event, fields in events if event == "pg_listener.backoff"]
    # Three refusals (attempts 1-3), then the loss: a fresh back-off from attempt 1.
    assert backoffs == [1, 2, 3, 1]
    warnings = [(event, fields.get("attempt")) for level, event, fields in events if level >= 30]
    assert warnings == [
        ("pg_listener.connect_failed", 1),
        ("pg_listener.connect_failed", 2),
        ("pg_listener.connect_failed", 3),
        ("pg_listener.connection_lost", None),
    ]
    # The password stays out of every record, stamina's included.
    assert "hunter2" not in caplog.text
    assert capsys.readouterr().out == ""


async def test_listener_cancelled_during_backoff_reraises() -> None:
    server = FlakyServer(refusals=ATTEMPTS)
    # A real (not testing-mode) back-off of 60 s: the listener is asleep when cancelled.
    listener = _listener(server, backoff_initial=60.0, backoff_max=60.0, backoff_jitter=0)
    task = asyncio.create_task(listener.run())
    async with asyncio.timeout(10):
        await server.called.wait()
    await asyncio.sleep(0)  # the refusal is logged and the back-off's sleep begins
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert server.calls == 1


# -- SSH connects --------------------------------------------------------------------------


def _executor() -> tuple[ssh.SshExecutor, Any]:
    executor = ssh.SshExecutor(targets={"dead": ssh.SshTarget(host="127.0.0.5", port=2222)})
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
    executor, host = _executor()
    with (
        stamina.set_testing(True, attempts=ssh.CONNECT_ATTEMPTS),
        pytest.raises(HostUnreachable, match=r"host 'dead' \(127\.0\.0\.5:2222\)"),
    ):
        await executor._connect(host)
    assert calls == ssh.CONNECT_ATTEMPTS
    retried = [r for r in caplog.records if r.name == "aeventor.ssh"]
    assert [r.fields["attempt"] for r in retried] == list(  # type: ignore[attr-defined]
        range(1, ssh.CONNECT_ATTEMPTS)
    )


async def test_ssh_connect_does_not_retry_a_refused_login(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    async def deny(host: str, **options: Any) -> None:
        nonlocal calls
        calls += 1
        raise asyncssh.PermissionDenied("no")

    monkeypatch.setattr(asyncssh, "connect", deny)
    executor, host = _executor()
    with (
        stamina.set_testing(True, attempts=ssh.CONNECT_ATTEMPTS),
        pytest.raises(HostUnreachable),
    ):
        await executor._connect(host)
    assert calls == 1


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
    with stamina.set_testing(True, attempts=ATTEMPTS):
        async with db, db.reading() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
    assert len(seen) == 3
    assert mode == "wal"


async def test_wal_switch_gives_up_after_the_busy_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _locked_pragma(monkeypatch, failures=ATTEMPTS)
    db = open_store(f"sqlite+aiosqlite:///{tmp_path}/s.db", program="p")
    clock = FakeClock()

    def ticking() -> float:
        clock.now += 5.0
        return clock.now

    db.clock = ticking
    with (
        stamina.set_testing(True, attempts=ATTEMPTS),
        pytest.raises(DatabaseError, match="cannot switch to WAL: database is locked"),
    ):
        await db.open()
