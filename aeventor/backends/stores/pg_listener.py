"""A robust PostgreSQL ``LISTEN`` connection.

:class:`PgListener` keeps one dedicated asyncpg connection per process ``LISTEN``-ing on a
set of channels and hands every notification to a synchronous callback. It survives
server restarts, terminated backends and half-open TCP connections by reconnecting with
capped, fully jittered exponential back-off (:func:`aeventor.utils.backoff`).

Notifications sent while the listener is disconnected are lost (Postgres does not queue
them for absent listeners), so the caller's ``on_connect`` callback runs after every
(re)connect to rescan for work it may have missed.

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import sqlalchemy.engine
import sqlalchemy.exc
import tenacity

from aeventor.exceptions import ConfigurationError, ConnectionLost, StoreConfigError
from aeventor.logs import get_logger
from aeventor.utils import backoff

__all__ = ("PgListener", "asyncpg_dsn")

#: Bound on establishing a connection and issuing the ``LISTEN`` statements. asyncpg's own
#: default (60 s) would leave a listener stuck on a server that accepts TCP but never answers.
_CONNECT_TIMEOUT: Final = 10.0
#: Bound on the graceful close at cancellation; past it the socket is simply aborted.
_CLOSE_TIMEOUT: Final = 2.0

#: Everything the driver or the socket raises when the server or the network fails. These
#: only ever drive a reconnect; they never leave :meth:`PgListener.run`. ``TimeoutError`` is
#: an ``OSError`` and is covered too.
_DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)

#: Query options that only SQLAlchemy's asyncpg dialect understands; asyncpg would forward
#: them to the server as settings, which the server rejects.
_SQLALCHEMY_ONLY_QUERY_KEYS: Final = frozenset(
    {"prepared_statement_cache_size", "prepared_statement_name_func"}
)


def asyncpg_dsn(url: sqlalchemy.engine.URL | str) -> str:
    """Convert a SQLAlchemy PostgreSQL URL into a DSN asyncpg accepts.

    ``postgresql+asyncpg://user:pw@host:5432/db`` becomes ``postgresql://user:pw@host:5432/db``.
    The password is kept (the result is a secret: do not log it), and query options that
    only SQLAlchemy's asyncpg dialect understands are dropped.

    Args:
        url: a SQLAlchemy URL object or string whose backend is ``postgresql``.

    Returns:
        A ``postgresql://`` DSN.

    Raises:
        StoreConfigError: ``url`` cannot be parsed or is not a PostgreSQL URL.

    .. versionadded:: 0.1
    """
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        # Never echo the URL itself: it may carry a password.
        raise StoreConfigError(
            "url: cannot parse the database URL; expected a form like "
            "'postgresql+asyncpg://user:password@host:5432/dbname'"
        ) from exc
    if parsed.get_backend_name() != "postgresql":
        raise StoreConfigError(
            f"url: the listener needs a PostgreSQL URL, got backend "
            f"{parsed.get_backend_name()!r}; use 'postgresql+asyncpg://...'"
        )
    query = {k: v for k, v in parsed.query.items() if k not in _SQLALCHEMY_ONLY_QUERY_KEYS}
    return parsed.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


@contextlib.contextmanager
def _wrap_exceptions(what: str, redact: Callable[[str], str]) -> Iterator[None]:
    """Re-raise driver and socket errors as :class:`ConnectionLost`, chained.

    The message goes through ``redact``: the listener logs it.
    """
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise ConnectionLost(redact(f"{what}: {type(exc).__name__}: {exc}")) from exc


@dataclass(eq=False)
class _Link:
    """One live connection and the event that wakes the supervisor when it needs attention."""

    conn: Any  # asyncpg.Connection; asyncpg ships no type information.
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class PgListener:
    """One dedicated asyncpg connection per process ``LISTEN``-ing on channels.

    Args:
        dsn: an asyncpg DSN (see :func:`asyncpg_dsn`). It may hold a password; the listener
            never logs it.
        channels: the channels to ``LISTEN`` on; at least one. Names are quoted by asyncpg.
        on_notify: called as ``on_notify(channel, payload)`` for each notification,
            synchronously from asyncpg's callback; it must not block. If it raises, the
            listener closes its connection and :meth:`run` re-raises the error: a broken
            callback must stop its supervisor rather than fail silently.
        on_connect: called after every successful (re)connect, once ``LISTEN`` is active,
            so the caller can rescan for work whose notifications were lost meanwhile.
        backoff_initial: the ceiling of the first reconnect delay, in seconds.
        backoff_max: the cap on reconnect delays, in seconds.
        health_interval: seconds between health checks (``SELECT 1`` bounded by the same
            duration) that detect a half-open connection, which the termination listener
            cannot see.
        sleep: awaited for the back-off delays; inject a no-op to test without waiting.
        connect: called as ``connect(dsn)`` to open a connection; defaults to
            :func:`asyncpg.connect`. Tests inject a wrapper to observe or break connections.

    Raises:
        ConfigurationError: an argument is out of range.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        dsn: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_connect: Callable[[], None] | None = None,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        health_interval: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connect: Callable[..., Awaitable[asyncpg.Connection]] | None = None,
    ) -> None:
        if isinstance(channels, str):
            raise ConfigurationError(
                f"channels: expected a sequence of channel names, got the string "
                f"{channels!r}; pass [{channels!r}]"
            )
        unique_channels = tuple(dict.fromkeys(channels))
        if not unique_channels or not all(unique_channels):
            raise ConfigurationError("channels: pass at least one non-empty channel name")
        if backoff_initial <= 0:
            raise ConfigurationError(f"backoff_initial: must be > 0, got {backoff_initial}")
        if backoff_max < backoff_initial:
            raise ConfigurationError(
                f"backoff_max: must be >= backoff_initial ({backoff_initial}), got {backoff_max}"
            )
        if health_interval <= 0:
            raise ConfigurationError(f"health_interval: must be > 0, got {health_interval}")
        self._dsn = dsn
        self._channels = unique_channels
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._health_interval = health_interval
        self._sleep = sleep
        self._connect: Callable[..., Awaitable[asyncpg.Connection]] = (
            asyncpg.connect if connect is None else connect
        )
        self._password = _password_of(dsn)
        self._log = get_logger("aeventor.pg_listener")
        self._connected = False
        self._ever_connected = False
        self._reconnects = 0
        self._callback_error: Exception | None = None
        #: The live connection, and channels added while it is live but not LISTENed yet.
        self._link: _Link | None = None
        self._pending: list[str] = []

    @property
    def connected(self) -> bool:
        """Whether a connection is open and ``LISTEN`` is active on every channel."""
        return self._connected

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels listened on (or about to be: see :meth:`add_channels`)."""
        return self._channels

    def add_channels(self, channels: Sequence[str]) -> None:
        """Listen on ``channels`` too, from now on and after every reconnect.

        Returns at once: a live connection issues ``LISTEN`` from :meth:`run`, then calls
        ``on_connect`` (notifications sent before the ``LISTEN`` took effect are lost, so
        the caller rescans, as after a reconnect). Channels already listened on are ignored.

        Raises:
            ConfigurationError: a channel name is empty, or ``channels`` is a string.
        """
        if isinstance(channels, str):
            raise ConfigurationError(
                f"channels: expected a sequence of channel names, got the string "
                f"{channels!r}; pass [{channels!r}]"
            )
        if not all(channels):
            raise ConfigurationError("channels: channel names must be non-empty")
        new = [channel for channel in dict.fromkeys(channels) if channel not in self._channels]
        if not new:
            return
        self._channels = (*self._channels, *new)
        if self._link is not None:
            self._pending.extend(new)
            self._link.wake.set()

    @property
    def reconnects(self) -> int:
        """How many times the listener connected again after its first connection."""
        return self._reconnects

    async def run(self, *, task_status: asyncio.Event | None = None) -> None:
        """Listen until cancelled, reconnecting whenever the connection is lost.

        Each cycle connects, issues ``LISTEN`` on every channel, calls ``on_connect`` and
        then watches the connection: asyncpg's termination listener reports a closed socket
        at once, and a ``SELECT 1`` every ``health_interval`` seconds catches a half-open
        connection. Between cycles :func:`aeventor.utils.backoff` waits, exponentially longer
        (full jitter, capped) while connecting fails; every successful connect starts the
        back-off over. Driver and socket errors never escape.

        Args:
            task_status: set once, when ``LISTEN`` is first active (readiness handshake).

        Raises:
            asyncio.CancelledError: on cancellation, after closing the connection (under a
                short timeout).
            Exception: whatever ``on_notify`` or ``on_connect`` raised.
        """
        self._callback_error = None
        lost: ConnectionLost | None = None
        while True:
            # A new back-off after each connection: it starts over from the first delay.
            async for attempt in self._backoff():
                with attempt:
                    if lost is not None:
                        # An established connection was lost: that counts as the first failed
                        # attempt, so the first delay passes before reconnecting and a server
                        # dropping every connection at once meets back-off, not a busy loop.
                        exc, lost = lost, None
                        raise exc
                    lost = await self._cycle(attempt.retry_state.attempt_number, task_status)

    def _backoff(self) -> tenacity.AsyncRetrying:
        return backoff(
            initial=self._backoff_initial,
            maximum=self._backoff_max,
            stop=tenacity.stop_never,
            retry_on=lambda exc: isinstance(exc, ConnectionLost),
            sleep=self._sleep,
            log=self._log,
            event="pg_listener.backoff",
            level=logging.DEBUG,
        )

    async def _cycle(self, attempt: int, task_status: asyncio.Event | None) -> ConnectionLost:
        """Connect, listen and watch; return the error that ended an established connection.

        Raises:
            ConnectionLost: connecting or ``LISTEN`` failed.
        """
        established = False
        try:
            async with self._listening() as link:
                established = True
                await self._connected_cycle(link, task_status)
        except ConnectionLost as exc:
            error = self._redact(str(exc))
            if not established:
                self._log.warning("pg_listener.connect_failed", error=error, attempt=attempt)
                raise
            self._log.warning("pg_listener.connection_lost", error=error)
            return exc
        raise AssertionError("unreachable: the watch ends only by raising")

    async def _connected_cycle(self, link: _Link, task_status: asyncio.Event | None) -> None:
        """Note the connection, tell the caller, then watch it until it is lost."""
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        self._connected = True
        # Quiet on the first connect (libraries should not chatter); a reconnect is news.
        if self._reconnects:
            self._log.info(
                "pg_listener.listening",
                channels=self._channels,
                reconnects=self._reconnects,
            )
        if self._on_connect is not None:
            self._on_connect()
        if task_status is not None and not task_status.is_set():
            task_status.set()
        await self._watch(link)

    @contextlib.asynccontextmanager
    async def _listening(self) -> AsyncIterator[_Link]:
        """Open a connection with ``LISTEN`` active and close it on the way out.

        A lost connection is aborted outright: a graceful close would wait on a peer that
        may never answer. Any other exit (cancellation, a callback error) closes gracefully
        under :data:`_CLOSE_TIMEOUT`.

        Raises:
            ConnectionLost: connecting or ``LISTEN`` failed.
        """
        with _wrap_exceptions("connect", self._redact):
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                conn = await self._connect(self._dsn)
        link = _Link(conn)
        lost = False
        # Channels added from here on are LISTENed by _watch (see add_channels).
        self._link, self._pending = link, []
        try:
            conn.add_termination_listener(lambda _conn: link.wake.set())
            await self._listen(link, self._channels)
            yield link
        except ConnectionLost:
            lost = True
            raise
        finally:
            self._connected = False
            self._link = None
            if lost:
                conn.terminate()
            else:
                await self._close(conn)

    async def _listen(self, link: _Link, channels: Sequence[str]) -> None:
        with _wrap_exceptions("LISTEN", self._redact):
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                for channel in channels:
                    await link.conn.add_listener(channel, self._make_callback(link))

    def _make_callback(self, link: _Link) -> Callable[[object, int, str, str], None]:
        def deliver(_conn: object, _pid: int, channel: str, payload: str) -> None:
            # asyncpg runs this through loop.call_soon, where an exception would only reach
            # the loop's exception handler. Keep it and wake the supervisor, which re-raises
            # it from run(): the catch is not blind, nothing is swallowed.
            if self._callback_error is not None:
                return
            try:
                self._on_notify(channel, payload)
            except Exception as exc:  # noqa: BLE001 - re-raised by _watch()
                self._callback_error = exc
                link.wake.set()

        return deliver

    async def _watch(self, link: _Link) -> None:
        """Return never; raise when the connection is lost or a callback failed. Issue
        ``LISTEN`` for the channels added meanwhile.

        Raises:
            ConnectionLost: the connection closed or failed its health check.
            Exception: what ``on_notify`` raised.
        """
        while True:
            try:
                async with asyncio.timeout(self._health_interval):
                    await link.wake.wait()
            except TimeoutError:
                await self._check_health(link.conn)
                continue
            if self._callback_error is not None:
                raise self._callback_error
            if self._pending and not link.conn.is_closed():
                # Channels added while connected (a lost connection sets the event again).
                link.wake.clear()
                pending, self._pending = self._pending, []
                await self._listen(link, pending)
                if self._on_connect is not None:
                    self._on_connect()
                continue
            raise ConnectionLost("the connection was closed")

    async def _check_health(self, conn: Any) -> None:
        """Raise :class:`ConnectionLost` unless the server answers within the interval.

        A half-open connection (the peer vanished without a FIN or RST: a NAT or firewall
        dropped its state, a host lost power) looks open locally and raises nothing on its
        own; only a request that gets no answer reveals it.
        """
        if conn.is_closed():
            raise ConnectionLost("the connection was closed")
        with _wrap_exceptions("health check", self._redact):
            async with asyncio.timeout(self._health_interval):
                await conn.fetchval("SELECT 1")

    async def _close(self, conn: Any) -> None:
        try:
            await conn.close(timeout=_CLOSE_TIMEOUT)
        except _DRIVER_ERRORS as exc:
            # asyncpg has already aborted the socket; nothing is left to release.
            self._log.debug("pg_listener.close_failed", error=self._redact(str(exc)))

    def _redact(self, text: str) -> str:
        """Remove the DSN's password from ``text`` should a driver message ever echo it."""
        return text.replace(self._password, "***") if self._password else text


def _password_of(dsn: str) -> str | None:
    """The password in ``dsn``, if it has one and is a URL."""
    try:
        return sqlalchemy.engine.make_url(dsn).password
    except sqlalchemy.exc.ArgumentError:
        return None
