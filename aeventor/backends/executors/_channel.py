"""The worker's side of a process step's channel: the step fires events through it.

A process step calls ``aeventor.current_step().trigger(event, sequence=...)`` in its own
process (see :class:`aeventor.context._ChannelStep`); the call travels as one JSON line,
``{"event": ..., "sequence": ...}``, and returns once the worker answered ``{"ok": true}``,
or raises ``{"error": "..."}``'s text. How the step reaches its worker is the executor's
business: a socket pair whose descriptor the step inherits (local steps), or a Unix socket
on the step's host that SSH forwards back to the worker (SSH steps). Both are served here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ...exceptions import AeventorError

__all__ = ("ChannelReader", "ChannelWriter", "Fire", "serve_channel")

#: Fires ``(event, sequence)`` for the step (the launch's ``on_trigger``).
Fire = Callable[[str, str], Awaitable[None]]


class ChannelReader(Protocol):
    """What :func:`serve_channel` reads: an asyncio or asyncssh stream, in bytes."""

    async def readline(self) -> bytes: ...


class ChannelWriter(Protocol):
    """What :func:`serve_channel` answers on: an asyncio or asyncssh stream, in bytes."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


async def serve_channel(reader: ChannelReader, writer: ChannelWriter, fire: Fire) -> None:
    """Serve a step's channel until the step closes it: each line is
    ``{"event": ..., "sequence": ...}``; it is fired and answered ``{"ok": true}`` or
    ``{"error": "..."}`` (the step raises that), in order. Closes ``writer`` on the way out."""
    try:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                await fire(str(message["event"]), str(message["sequence"]))
                reply: dict[str, Any] = {"ok": True}
            except AeventorError as exc:
                reply = {"error": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": f"a message the worker cannot read ({exc!r}): {line[:200]!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the step went away mid-message: what it fired is recorded or not, as it got
    finally:
        writer.close()
