"""A loopback TCP proxy that loses acknowledgements of commits, on purpose.

:class:`FaultProxy` listens on ``127.0.0.1`` (a free port) and forwards every connection to
a database server, bytes unchanged, both ways. It reads the client's side of each connection
with just enough of the wire protocol to know which statements it carries:

- **Postgres** (:class:`PgFrontend`): after the untyped start-up messages, every frontend
  message is a type byte and an int32 length (the length counts itself, not the type byte).
  asyncpg sends ``BEGIN``/``COMMIT``/``ROLLBACK`` as simple queries (``'Q'``: the SQL text
  ending in NUL) and SQLAlchemy's statements with the extended protocol: ``'P'`` (Parse:
  statement name, SQL text, ...) once per prepared statement and connection, then ``'B'``
  (Bind: portal name, statement name, ...) and ``'E'`` (Execute) per execution. So the proxy
  remembers each connection's statement names and attributes a Bind to the SQL it was
  parsed from. An ``SSLRequest`` or ``GSSENCRequest`` is answered ``'N'`` by the proxy
  itself: the client (``sslmode=prefer``) then talks in clear, which the proxy can read.
- **MySQL/MariaDB** (:class:`MySqlFrontend`): every packet is a 3-byte little-endian payload
  length and a sequence id; a command starts a new exchange (sequence id 0) and its first
  payload byte says which: ``COM_QUERY`` (0x03) carries the SQL text, values already
  inlined by aiomysql, ``COMMIT`` included.

It also reads the server's replies for row counts (Postgres ``CommandComplete`` tags such as
``UPDATE 1``; the affected rows of MySQL's OK packets), so that a rule can pick only a
transaction whose statement actually changed rows (a claim that took a step run, not one
that found nothing).

A :class:`~.cuts.Cut` rule, once armed, picks a ``COMMIT``: every Nth one, or every Nth one
of a transaction in which a statement matching a regular expression changed rows. The proxy
forwards that ``COMMIT`` to the server, waits for the server's first reply bytes (proof that
the server has executed it: the transaction is durable), drops those bytes and aborts both
sides of the connection. The client sees its connection die with its commit unacknowledged,
which is what a network partition at the wrong moment does. With ``hold=True`` the proxy
holds the acknowledgement instead, until the test calls ``rule.release()``: the test can
act (freeze the client, say) between the commit and the moment the client hears of it.

New connections can also be refused (accepted and closed at once) or stalled (held, not yet
connected to the server) for a while: :meth:`FaultProxy.refuse` and :meth:`FaultProxy.stall`.

Everything runs in the test's event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Self

from .cuts import Cut, Rules, Statement

Protocol = Literal["postgres", "mysql"]

#: Postgres start-up request codes (sent where the protocol version would be).
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102

_TRANSACTION_END = re.compile(r"^\s*(COMMIT|ROLLBACK|END|ABORT)\b", re.IGNORECASE)
_COMMIT = re.compile(r"^\s*(COMMIT|END)\b", re.IGNORECASE)


class _Frontend:
    """Splits a client's byte stream into messages and tracks its transaction."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        #: Statements of the transaction in progress on this connection.
        self.transaction: list[Statement] = []

    def feed(self, data: bytes) -> list[tuple[bytes, str | None]]:
        """Split off complete messages: each with the SQL it executes (None: no SQL)."""
        raise NotImplementedError

    def statement(self, sql: str) -> tuple[bool, list[Statement]]:
        """Record an executed statement; whether it commits, and the transaction it ends."""
        if _TRANSACTION_END.match(sql):
            ended, self.transaction = self.transaction, []
            return bool(_COMMIT.match(sql)), ended
        if not re.match(r"^\s*(BEGIN|START TRANSACTION)\b", sql, re.IGNORECASE):
            self.transaction.append(Statement(sql))
        return False, []

    def affected(self, rows: int) -> None:
        """The server reported ``rows`` for the last statement (its reply comes before the
        client sends the next one)."""
        if self.transaction and self.transaction[-1].rows is None:
            self.transaction[-1].rows = rows

    def reply(self, data: bytes) -> None:
        """Read the server's side of the connection for row counts."""
        raise NotImplementedError


class PgFrontend(_Frontend):
    """The Postgres frontend protocol, just enough to see the SQL each message executes."""

    def __init__(self) -> None:
        super().__init__()
        self.started = False
        #: prepared statement name -> SQL text (per connection; "" is the unnamed one).
        self.prepared: dict[bytes, str] = {}
        #: Replies the proxy owes the client itself (``'N'`` to an SSL request).
        self.replies: list[bytes] = []
        self.replies_buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, str | None]]:
        self.buffer += data
        messages: list[tuple[bytes, str | None]] = []
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    break
                (length,) = struct.unpack_from("!i", self.buffer, 0)
                if len(self.buffer) < length:
                    break
                message = bytes(self.buffer[:length])
                del self.buffer[:length]
                (code,) = struct.unpack_from("!i", message, 4)
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    # Not forwarded: the proxy says "no encryption" so the client talks
                    # in clear.
                    self.replies.append(b"N")
                    messages.append((b"", None))
                    continue
                if code != _CANCEL_REQUEST:
                    self.started = True
                messages.append((message, None))
                continue
            if len(self.buffer) < 5:
                break
            kind = self.buffer[0:1]
            (length,) = struct.unpack_from("!i", self.buffer, 1)
            if len(self.buffer) < 1 + length:
                break
            message = bytes(self.buffer[: 1 + length])
            del self.buffer[: 1 + length]
            body = message[5:]
            sql: str | None = None
            if kind == b"Q":
                sql = body.split(b"\0", 1)[0].decode(errors="replace")
            elif kind == b"P":
                name, rest = body.split(b"\0", 1)
                self.prepared[name] = rest.split(b"\0", 1)[0].decode(errors="replace")
            elif kind == b"B":
                _portal, rest = body.split(b"\0", 1)
                name = rest.split(b"\0", 1)[0]
                sql = self.prepared.get(name)
            elif kind == b"C" and body[:1] == b"S":
                self.prepared.pop(body[1:].split(b"\0", 1)[0], None)
            messages.append((message, sql))
        return messages

    def reply(self, data: bytes) -> None:
        # Backend messages: type byte, int32 length. CommandComplete ('C') carries the tag,
        # e.g. "UPDATE 1", "INSERT 0 3", "SELECT 2": its last word is the row count.
        self.replies_buffer += data
        while len(self.replies_buffer) >= 5:
            (length,) = struct.unpack_from("!i", self.replies_buffer, 1)
            if len(self.replies_buffer) < 1 + length:
                break
            kind = self.replies_buffer[0:1]
            body = bytes(self.replies_buffer[5 : 1 + length])
            del self.replies_buffer[: 1 + length]
            if kind == b"C":
                last = body.rstrip(b"\0").rsplit(b" ", 1)[-1]
                if last.isdigit():
                    self.affected(int(last))


class MySqlFrontend(_Frontend):
    """MySQL client packets, just enough to see the SQL of each ``COM_QUERY``."""

    COM_QUERY = 0x03

    def __init__(self) -> None:
        super().__init__()
        self.replies_buffer = bytearray()

    def reply(self, data: bytes) -> None:
        # The first packet of a reply (sequence id 1) is an OK packet (0x00, then the
        # affected rows as a length-encoded integer), an error (0xff) or a result set's
        # column count.
        self.replies_buffer += data
        while len(self.replies_buffer) >= 4:
            length = int.from_bytes(self.replies_buffer[0:3], "little")
            if len(self.replies_buffer) < 4 + length:
                break
            sequence = self.replies_buffer[3]
            payload = bytes(self.replies_buffer[4 : 4 + length])
            del self.replies_buffer[: 4 + length]
            if sequence == 1 and length >= 7 and payload[0] == 0x00:
                self.affected(_lenenc_int(payload, 1))

    def feed(self, data: bytes) -> list[tuple[bytes, str | None]]:
        self.buffer += data
        messages: list[tuple[bytes, str | None]] = []
        while len(self.buffer) >= 4:
            length = int.from_bytes(self.buffer[0:3], "little")
            if len(self.buffer) < 4 + length:
                break
            packet = bytes(self.buffer[: 4 + length])
            del self.buffer[: 4 + length]
            sequence, payload = packet[3], packet[4:]
            sql = None
            if sequence == 0 and payload[:1] == bytes([self.COM_QUERY]):
                sql = payload[1:].decode(errors="replace")
            messages.append((packet, sql))
        return messages


def _lenenc_int(data: bytes, at: int) -> int:
    first = data[at]
    if first < 0xFB:
        return first
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first, 0)
    return int.from_bytes(data[at + 1 : at + 1 + size], "little")


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    frontend: _Frontend
    #: The rule of a COMMIT the proxy forwarded and acts on: the server's next bytes
    #: acknowledge it; they are dropped (and the connection cut), or held.
    picked: Cut | None = None


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a Postgres or MySQL server.

    Args:
        protocol: ``"postgres"`` or ``"mysql"``: how to read the clients' messages.
        upstream: the server's ``(host, port)``.

    Use ``async with FaultProxy(...) as proxy``; :meth:`url` rewrites a store URL to go
    through it.
    """

    def __init__(self, protocol: Protocol, upstream: tuple[str, int]) -> None:
        self.protocol = protocol
        self.upstream = upstream
        self.port = 0
        self.rules = Rules()
        #: Every COMMIT forwarded, and every cut made (for assertions and messages).
        self.commits = 0
        self.cuts = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._live: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusing = False
        self._open = asyncio.Event()
        self._open.set()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and cut every connection; wait until each one's task has ended."""
        if self._server is not None:
            self._server.close()
        self._refusing = True
        self._open.set()
        for rule in self.rules.armed:
            rule.release()
        self.drop_all()
        # Not cancelled: with their sockets aborted, the connections' tasks end by themselves.
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        import sqlalchemy.engine

        parsed = sqlalchemy.engine.make_url(url)
        return parsed.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    # -- faults ----------------------------------------------------------------------------

    def cut_after_commit(
        self,
        after: str | None = None,
        *,
        nth: int = 1,
        times: int = 1,
        changed: bool = True,
        hold: bool = False,
    ) -> Cut:
        """Arm a rule: let the chosen COMMIT reach the server, then cut its connection.

        Args:
            after: a regular expression one statement of the transaction must match
                (``"SKIP LOCKED"`` picks claims: see :mod:`tests.faults.sql`); None: any
                transaction.
            nth: every nth matching COMMIT (1: the next one).
            times: how many cuts before the rule disarms itself.
            changed: only when the matching statement affected at least one row (the
                server's reply says how many).
            hold: hold the acknowledgement until ``rule.release()`` instead of cutting.
        """
        return self.rules.arm(after, nth=nth, times=times, changed=changed, hold=hold)

    def drop_all(self) -> None:
        """Cut every connection through the proxy now (both sides)."""
        for conn in list(self._live):
            self._abort(conn)

    @asynccontextmanager
    async def refuse(self) -> AsyncIterator[None]:
        """While inside, new connections are accepted and closed at once (no server)."""
        self._refusing = True
        try:
            yield
        finally:
            self._refusing = False

    @asynccontextmanager
    async def stall(self) -> AsyncIterator[None]:
        """While inside, new connections wait (not yet connected to the server)."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    # -- forwarding ------------------------------------------------------------------------

    def _frontend(self) -> _Frontend:
        return PgFrontend() if self.protocol == "postgres" else MySqlFrontend()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs this in a task of its own; aclose() waits for it.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.connections += 1
        if self._refusing:
            writer.transport.abort()
            return
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()  # the server is down: so is the proxy, to the client
            return
        conn = _Connection(writer, up_writer, self._frontend())
        self._live.add(conn)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._client_to_server(conn, reader))
                tg.create_task(self._server_to_client(conn, up_reader))
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._abort(conn)

    def _abort(self, conn: _Connection) -> None:
        self._live.discard(conn)
        for writer in (conn.client, conn.server):
            # abort() (RST), not close(): nothing queued is delivered any more.
            writer.transport.abort()

    async def _client_to_server(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        frontend = conn.frontend
        while data := await reader.read(65536):
            for message, sql in frontend.feed(data):
                if isinstance(frontend, PgFrontend) and frontend.replies:
                    conn.client.write(b"".join(frontend.replies))
                    frontend.replies.clear()
                if not message:
                    continue
                rule = None
                if sql is not None:
                    commits, transaction = frontend.statement(sql)
                    if commits:
                        self.commits += 1
                        rule = self.rules.pick(transaction)
                if rule is not None:
                    # Before the COMMIT goes: its reply is the next thing the server sends.
                    conn.picked = rule
                conn.server.write(message)
                if rule is not None and not rule.hold:
                    self.cuts += 1
                    await conn.server.drain()
                    return  # _server_to_client cuts both sides at the acknowledgement
            await conn.server.drain()
        # The client closed its side: pass that on.
        conn.server.write_eof()

    async def _server_to_client(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            rule, conn.picked = conn.picked, None
            if rule is not None:
                # The acknowledgement of the picked COMMIT: the server has committed.
                rule.committed.set()
                if not rule.hold:
                    self._abort(conn)
                    return
                await rule.released.wait()
            # Row counts first, then forward: the client's next statement comes after.
            conn.frontend.reply(data)
            conn.client.write(data)
            await conn.client.drain()
        conn.client.write_eof()


def server_port(url: str) -> tuple[str, int]:
    """The ``(host, port)`` a store URL names."""
    import sqlalchemy.engine

    parsed = sqlalchemy.engine.make_url(url)
    assert parsed.host and parsed.port, url
    return parsed.host, parsed.port
