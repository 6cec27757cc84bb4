"""Small asyncio helpers shared by the dispatcher and the agent."""

from __future__ import annotations

import asyncio
import traceback

__all__ = ("wait_any",)


async def wait_any(*events: asyncio.Event, poll: float | None) -> None:
    """Return when any of ``events`` is set or ``poll`` seconds pass (None: never).

    The waiters it creates are always cancelled and awaited, so none outlives the call.
    """
    waiters = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait(waiters, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def describe_exception(exc: BaseException) -> str:
    """The exception with its traceback, as text (a step's recorded error).

    Formatting reads the source files of every frame (linecache): done off the loop.
    """
    return await asyncio.to_thread(_describe, exc)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()
