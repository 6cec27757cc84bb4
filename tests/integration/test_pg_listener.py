"""Integration tests of :class:`aeventor.backends.stores.pg_listener.PgListener` on a real PostgreSQL.

The server defaults to ``127.0.0.1:5432`` (override with ``AEVENTOR_PG_URL``). Tests that
need it are skipped when it is unreachable, except under ``CI=true`` where they fail.
Every wait is on a condition with a deadline; the listener task always runs inside a
TaskGroup that the test leaves only after cancelling it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import asyncpg
import pytest
import sqlalchemy.engine

from aeventor.backends.stores.pg_listener import PgListener, asyncpg_dsn
from aeventor.exceptions import ConfigurationError, StoreConfigError

from ..backends import restart_postgres

PG_URL = os.environ.get("AEVENTOR_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DEADLINE = 15.0

postgres = pytest.mark.postgres


def _pg_version() -> str:
    etc = Path("/etc/postgresql")
    versions = sorted(p.name for p in etc.iterdir()) if etc.is_dir() else []
    return versions[-1] if versions else "<version>"


def _dsn(*, app: str | None = None, password: str | None = None, port: int | None = None) -> str:
    url = sqlalchemy.engine.make_url(PG_URL)
    if app is not None:
        url = url.update_query_dict({"application_name": app})
    if password is not None:
        url = url.set(password=password)
    if port is not None:
        url = url.set(port=port)
    return asyncpg_dsn(url)


async def no_sleep(delay: float) -> None:
    """An injectable ``sleep`` for the back-off: these tests never wait for a delay."""


def _listener_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aeventor.pg_listener"]


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    """A separate connection that sends NOTIFYs and inspects ``pg_stat_activity``."""
    try:
        conn = await asyncpg.connect(_dsn(app="aeventor-test-admin"), timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        url = sqlalchemy.engine.make_url(PG_URL)
        reason = (
            f"PostgreSQL is unreachable at {url.host}:{url.port} ({type(exc).__name__}: {exc}); "
            f"start it with: pg_ctlcluster --skip-systemctl-redirect {_pg_version()} main start"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield conn
    finally:
        await conn.close(timeout=5)


class Recorder:
    """Collects callbacks and lets a test wait, with a deadline, for a condition on them."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, str]] = []
        self.connects = 0
        self._changed = asyncio.Event()

    def on_notify(self, channel: str, payload: str) -> None:
        self.notifications.append((channel, payload))
        self._changed.set()

    def on_connect(self) -> None:
        self.connects += 1
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def running(listener: PgListener) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``listener`` in a TaskGroup, wait for readiness, cancel it on the way out."""
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.run(task_status=ready))
        try:
            async with asyncio.timeout(DEADLINE):
                await ready.wait()
            yield task
        finally:
            task.cancel()


async def backend_pids(admin: Any, app: str) -> list[int]:
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid", app
    )
    return [row["pid"] for row in rows]


async def wait_backends_gone(admin: Any, app: str) -> None:
    # The server ends a backend shortly after the client's Terminate message or socket
    # close. That is state inside the server with no event to wait on from here, so poll
    # it under a deadline.
    async with asyncio.timeout(DEADLINE):
        while await backend_pids(admin, app):  # noqa: ASYNC110 - polls the server, see above
            await asyncio.sleep(0.02)


def _channel(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _app() -> str:
    return f"aeventor-listener-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- pure units


def test_asyncpg_dsn() -> None:
    assert (
        asyncpg_dsn("postgresql+asyncpg://postgres@127.0.0.1:5432/test")
        == "postgresql://postgres@127.0.0.1:5432/test"
    )
    url = sqlalchemy.engine.URL.create(
        "postgresql+asyncpg",
        username="u",
        password="p@ss:w/rd",
        host="db",
        port=6543,
        database="d",
        query={"prepared_statement_cache_size": "0", "application_name": "x"},
    )
    dsn = asyncpg_dsn(url)
    assert dsn == "postgresql://u:p%40ss%3Aw%2Frd@db:6543/d?application_name=x"
    assert sqlalchemy.engine.make_url(dsn).password == "p@ss:w/rd"


def test_asyncpg_dsn_rejects_other_backends_without_echoing_password() -> None:
    with pytest.raises(StoreConfigError, match="PostgreSQL URL") as info:
        asyncpg_dsn("mysql+aiomysql://u:hunter2@h/d")
    assert "hunter2" not in str(info.value)
    with pytest.raises(StoreConfigError, match="cannot parse") as info:
        asyncpg_dsn("not a url hunter2")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": []}, "channels"),
        ({"channels": "jobs"}, "channels"),
        ({"backoff_initial": 0}, "backoff_initial"),
        ({"backoff_max": 0.01}, "backoff_max"),
        ({"health_interval": 0}, "health_interval"),
    ],
)
def test_constructor_validates(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"dsn": "postgresql://x/y", "channels": ["c"], "on_notify": print}
    with pytest.raises(ConfigurationError, match=match):
        PgListener(**(args | kwargs))


# --------------------------------------------------------------------------- real server


@postgres
async def test_receives_notifications_on_several_channels(admin: Any) -> None:
    rec = Recorder()
    channels = [_channel("jobs"), _channel("runs"), "Mixed Case-chan " + uuid.uuid4().hex[:6]]
    listener = PgListener(
        dsn=_dsn(), channels=channels, on_notify=rec.on_notify, on_connect=rec.on_connect
    )
    assert not listener.connected
    async with running(listener):
        assert listener.connected
        assert rec.connects == 1
        expected = [(ch, f"payload-{i}") for i, ch in enumerate(channels)]
        expected.append((channels[0], ""))
        for channel, payload in expected:
            await admin.execute("SELECT pg_notify($1, $2)", channel, payload)
        await rec.wait_until(lambda: len(rec.notifications) >= len(expected))
        assert rec.notifications == expected
        assert listener.reconnects == 0
    assert not listener.connected


@postgres
async def test_reconnects_after_backend_terminated(admin: Any) -> None:
    rec = Recorder()
    app, channel = _app(), _channel("jobs")
    listener = PgListener(
        dsn=_dsn(app=app), channels=[channel], on_notify=rec.on_notify, on_connect=rec.on_connect
    )
    async with running(listener):
        [pid] = await backend_pids(admin, app)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

        await rec.wait_until(lambda: rec.connects == 2)
        assert listener.reconnects == 1
        assert listener.connected
        [new_pid] = await backend_pids(admin, app)
        assert new_pid != pid

        await admin.execute("SELECT pg_notify($1, 'after')", channel)
        await rec.wait_until(lambda: bool(rec.notifications))
        assert rec.notifications == [(channel, "after")]


@postgres
@pytest.mark.timeout(90)
async def test_reconnects_after_server_restart(admin: Any) -> None:
    ctl = shutil.which("pg_ctlcluster")
    if ctl is None or sqlalchemy.engine.make_url(PG_URL).host not in ("127.0.0.1", "localhost"):
        pytest.skip("needs a local cluster that pg_ctlcluster can restart")
    rec = Recorder()
    channel = _channel("jobs")
    listener = PgListener(
        dsn=_dsn(),
        channels=[channel],
        on_notify=rec.on_notify,
        on_connect=rec.on_connect,
        backoff_max=0.5,
    )
    async with running(listener):
        await restart_postgres(ctl, _pg_version())

        # ">= 2": the server is shared, and anything else restarting it or terminating
        # backends meanwhile costs extra reconnects; the counters must still agree.
        await rec.wait_until(lambda: rec.connects >= 2)
        assert listener.reconnects == rec.connects - 1
        sender = await asyncpg.connect(_dsn(), timeout=5)
        try:
            await sender.execute("SELECT pg_notify($1, 'after restart')", channel)
        finally:
            await sender.close(timeout=5)
        await rec.wait_until(lambda: bool(rec.notifications))
        assert rec.notifications == [(channel, "after restart")]


class _ProxyLink:
    def __init__(self) -> None:
        self.frozen = False


class FreezableProxy:
    """A TCP forwarder to Postgres whose existing connections can be frozen.

    A frozen link silently drops every byte in both directions but keeps both sockets open:
    no FIN, no RST. To the listener this is exactly a half-open connection (a NAT or
    firewall that lost its state, a server host that lost power): writes succeed, nothing
    ever comes back, and asyncpg's termination listener never fires. New connections go
    through normally, as they would to a server reachable again.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._links: list[_ProxyLink] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # asyncio.Server does not own its handler tasks before 3.12: supervise them here.
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._server.wait_closed()
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
        if errors:
            raise ExceptionGroup("proxy handlers failed", errors)  # type: ignore[type-var]

    def freeze_existing(self) -> None:
        for link in self._links:
            link.frozen = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _ProxyLink()
        self._links.append(link)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                return
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(reader, up_writer, link))
                    tg.create_task(self._pump(up_reader, writer, link))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _ProxyLink) -> None:
        try:
            while data := await src.read(65536):
                if not link.frozen:
                    dst.write(data)
                    await dst.drain()
        except OSError:
            pass  # The peer reset its socket: this direction is over, like EOF.
        finally:
            # Closing one side ends the other pump too (its reader sees EOF).
            dst.close()


@postgres
async def test_detects_half_open_connection(admin: Any, caplog: pytest.LogCaptureFixture) -> None:
    url = sqlalchemy.engine.make_url(PG_URL)
    rec = Recorder()
    app, channel = _app(), _channel("jobs")
    async with FreezableProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        listener = PgListener(
            dsn=_dsn(app=app, port=proxy.port),
            channels=[channel],
            on_notify=rec.on_notify,
            on_connect=rec.on_connect,
            health_interval=0.3,
        )
        with caplog.at_level(logging.DEBUG, logger="aeventor.pg_listener"):
            async with running(listener):
                await admin.execute("SELECT pg_notify($1, 'before')", channel)
                await rec.wait_until(lambda: len(rec.notifications) == 1)

                proxy.freeze_existing()
                # Sent while the link is frozen: lost, which is why on_connect rescans.
                await admin.execute("SELECT pg_notify($1, 'lost')", channel)
                await rec.wait_until(lambda: rec.connects == 2)
                assert listener.reconnects == 1

                await admin.execute("SELECT pg_notify($1, 'after')", channel)
                await rec.wait_until(lambda: len(rec.notifications) == 2)
        assert rec.notifications == [(channel, "before"), (channel, "after")]
        lost = [
            r
            for r in _listener_records(caplog)
            if r.event == "pg_listener.connection_lost"  # type: ignore[attr-defined]
        ]
        assert len(lost) == 1
        assert lost[0].levelno == logging.WARNING
        assert "health check" in lost[0].fields["error"]  # type: ignore[attr-defined]
    await wait_backends_gone(admin, app)


@postgres
async def test_backoff_grows_then_resets_after_connect(
    admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    app, channel = _app(), _channel("jobs")
    calls = 0

    async def flaky_connect(dsn: str) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise ConnectionRefusedError("simulated refusal")
        return await asyncpg.connect(dsn)

    delays: list[float] = []

    async def recorded_sleep(delay: float) -> None:
        delays.append(delay)

    listener = PgListener(
        dsn=_dsn(app=app),
        channels=[channel],
        on_notify=rec.on_notify,
        on_connect=rec.on_connect,
        backoff_initial=1.0,
        backoff_max=3.0,
        sleep=recorded_sleep,
        connect=flaky_connect,
    )

    def backoffs() -> list[int]:
        return [
            r.fields["attempt"]  # type: ignore[attr-defined]
            for r in _listener_records(caplog)
            if r.event == "pg_listener.backoff"  # type: ignore[attr-defined]
        ]

    # No real delays: the recorded ones and the attempt numbers show the back-off's progress.
    with caplog.at_level(logging.DEBUG, logger="aeventor.pg_listener"):
        async with running(listener):
            assert backoffs() == [1, 2, 3]
            assert len(delays) == 3
            assert 0 <= delays[0] <= 1.0 and 0 <= delays[1] <= 2.0 and 0 <= delays[2] <= 3.0
            [pid] = await backend_pids(admin, app)
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await rec.wait_until(lambda: rec.connects == 2)
            # One delay after the loss, from a back-off that started over.
            assert backoffs() == [1, 2, 3, 1]
            assert len(delays) == 4
            assert 0 <= delays[3] <= 1.0
            assert listener.reconnects == 1


@postgres
async def test_cancellation_closes_connection_and_reraises(admin: Any) -> None:
    app = _app()
    listener = PgListener(dsn=_dsn(app=app), channels=[_channel("jobs")], on_notify=print)
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.run(task_status=ready))
        async with asyncio.timeout(DEADLINE):
            await ready.wait()
        assert len(await backend_pids(admin, app)) == 1
        task.cancel()
        await asyncio.wait([task])
    assert task.cancelled()
    assert not listener.connected
    await wait_backends_gone(admin, app)


@postgres
async def test_on_notify_error_propagates_and_closes(admin: Any) -> None:
    app, channel = _app(), _channel("jobs")

    def broken(channel: str, payload: str) -> None:
        raise RuntimeError(f"boom: {payload}")

    listener = PgListener(dsn=_dsn(app=app), channels=[channel], on_notify=broken)
    ready = asyncio.Event()
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom: x")):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(listener.run(task_status=ready))
            async with asyncio.timeout(DEADLINE):
                await ready.wait()
                await admin.execute("SELECT pg_notify($1, 'x')", channel)
                await asyncio.Event().wait()  # The TaskGroup cancels this when run() fails.
    assert not listener.connected
    await wait_backends_gone(admin, app)


@postgres
async def test_password_is_never_logged(admin: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Trust authentication ignores the password, so a made-up one still connects.
    secret = "s3cret-" + uuid.uuid4().hex
    app, channel = _app(), _channel("jobs")
    rec = Recorder()
    calls = 0

    async def connect_echoing_dsn(dsn: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(f"could not reach {dsn}")  # A driver message quoting the DSN.
        return await asyncpg.connect(dsn)

    listener = PgListener(
        dsn=_dsn(app=app, password=secret),
        channels=[channel],
        on_notify=rec.on_notify,
        on_connect=rec.on_connect,
        sleep=no_sleep,
        connect=connect_echoing_dsn,
    )
    with caplog.at_level(logging.DEBUG):
        async with running(listener):
            [pid] = await backend_pids(admin, app)
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await rec.wait_until(lambda: rec.connects == 2)
    events = [
        r.event  # type: ignore[attr-defined]
        for r in _listener_records(caplog)
        if r.levelno == logging.WARNING
    ]
    assert events == ["pg_listener.connect_failed", "pg_listener.connection_lost"]
    # The back-off's own records carry the exception's message too.
    assert any(
        r.event == "pg_listener.backoff"  # type: ignore[attr-defined]
        for r in _listener_records(caplog)
    )
    assert secret not in caplog.text
    assert not any(secret in repr(r.__dict__) for r in caplog.records)
