"""Small asyncio helpers shared by the dispatcher, the agent and the backends."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import tenacity

__all__ = ("backoff", "stop_at_deadline", "wait_any")


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


def backoff(
    *,
    initial: float,
    maximum: float,
    stop: tenacity.stop.StopBaseT,
    retry_on: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]],
    log: structlog.stdlib.BoundLogger,
    event: str | Callable[[BaseException], str],
    level: int = logging.WARNING,
    **fields: Any,
) -> tenacity.AsyncRetrying:
    """The retry policy of every aeventor back-off, as a :class:`tenacity.AsyncRetrying`.

    Delays are "full jitter": before retry ``n`` (1 after the first failed attempt) a uniform
    draw in ``[0, min(maximum, initial * 2 ** (n - 1))]``, which spreads the reconnects of
    many processes after a server restart instead of having them retry in lock-step.

    Before each delay one record goes to ``log`` (the library's standard-library loggers,
    never stdout): ``event`` at ``level``, with ``attempt`` (the failed attempt's number),
    ``delay`` (seconds), ``error`` (the exception's message) and ``fields``. Once ``stop``
    says so, or for an error ``retry_on`` rejects (cancellation included), the last error
    is re-raised as it is.

    Use it as ``async for attempt in backoff(...): with attempt: ...``.

    Args:
        initial: the ceiling of the first delay, in seconds.
        maximum: the cap on the ceilings, in seconds.
        stop: when to give up (:func:`tenacity.stop_after_attempt`, :data:`tenacity.stop_never`,
            :func:`stop_at_deadline`, ...); it is asked after each failure ``retry_on``
            accepts.
        retry_on: whether an error is worth another attempt.
        sleep: awaited for each delay (inject a no-op in tests).
        log: where the record before each delay goes.
        event: that record's event, or a function of the error that returns it.
        level: that record's level.
        fields: more key/value pairs for that record.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None and state.next_action is not None
        error = state.outcome.exception()
        assert error is not None
        log.log(
            level,
            event if isinstance(event, str) else event(error),
            **fields,
            attempt=state.attempt_number,
            delay=round(state.next_action.sleep, 3),
            error=str(error),
        )

    return tenacity.AsyncRetrying(
        sleep=sleep,
        stop=stop,
        wait=tenacity.wait_random_exponential(multiplier=initial, max=maximum),
        retry=tenacity.retry_if_exception(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )


def stop_at_deadline(clock: Callable[[], float], deadline: float) -> tenacity.stop.StopBaseT:
    """A tenacity stop condition: give up once ``clock()`` reaches ``deadline``.

    :func:`tenacity.stop_after_delay` measures on :func:`time.monotonic`; this one on an
    injectable clock, so tests can move time.
    """
    return lambda _state: clock() >= deadline


async def describe_exception(exc: BaseException) -> str:
    """The exception with its traceback, as text (a step's recorded error).

    Formatting reads the source files of every frame (linecache): done off the loop.
    """
    return await asyncio.to_thread(_describe, exc)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()
