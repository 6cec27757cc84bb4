"""SIGTERM drains standalone runs, then the process dies of it as it would have.

Without aeventor, SIGTERM kills a process at once. A process in ``await ev.run()`` would then
leave its run ``running`` and its steps ``active`` for ever. So while standalone runs are live
in the main thread, and only if nobody else handles SIGTERM (its disposition is the default),
aeventor handles it: every live run's worker stops claiming, gives running steps their
``grace`` period, terminates the rest, and the run is recorded ``cancelled``. When the last
live run has been recorded, the default disposition is restored and SIGTERM is delivered again,
so the process ends exactly as it would have, only later and cleanly. An application that
installs its own SIGTERM handler keeps it, and stops runs itself (``handle.cancel()``).

Signal dispositions are process-wide, so this is the one module-level state of the package;
:func:`reset` restores it (tests).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ("drain_on_sigterm", "reset")

_stops: set[asyncio.Event] = set()
_loop: asyncio.AbstractEventLoop | None = None
_received = False


def _on_sigterm() -> None:
    global _received
    _received = True
    for stop in _stops:
        stop.set()


@contextmanager
def drain_on_sigterm(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM while the block runs (see the module docstring)."""
    global _loop
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _loop is None:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield  # the application handles SIGTERM itself
            return
        loop.add_signal_handler(signal.SIGTERM, _on_sigterm)
        _loop = loop
    elif _loop is not loop:
        yield  # another loop in this thread owns the handler
        return
    _stops.add(stop)
    if _received:
        stop.set()
    try:
        yield
    finally:
        _stops.discard(stop)
        if not _stops:
            received = _received
            reset()
            if received:
                os.kill(os.getpid(), signal.SIGTERM)


def reset() -> None:
    """Give SIGTERM back its default disposition and forget live runs."""
    global _loop, _received
    loop, _loop = _loop, None
    if loop is not None and not loop.is_closed():
        loop.remove_signal_handler(signal.SIGTERM)
    _stops.clear()
    _received = False
