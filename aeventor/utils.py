"""Small asyncio helpers shared by the dispatcher and the agent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ("backoff_delay", "wait_any")


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


#: ``2.0 ** 64`` times any sane ``initial`` exceeds any sane cap; larger exponents would
#: only risk an ``OverflowError``.
_MAX_EXPONENT = 64


def backoff_delay(
    attempt: int, *, initial: float, maximum: float, rand: Callable[[], float]
) -> float:
    """Return how long to wait before reconnect attempt number ``attempt``.

    "Full jitter": a uniform draw in ``[0, min(maximum, initial * 2 ** attempt))``, which
    spreads the reconnects of many processes after a server restart instead of having
    them retry in lock-step.

    Args:
        attempt: the number of consecutive failed attempts so far, starting at 0.
        initial: the ceiling of the first delay, in seconds.
        maximum: the cap on the ceiling, in seconds.
        rand: returns a float in ``[0, 1)``; :func:`random.random` in production, a
            constant in tests.

    Returns:
        The delay in seconds.

    Raises:
        ValueError: ``attempt`` is negative, ``initial`` is not positive or ``maximum`` is
            below ``initial``.

    .. versionadded:: 0.1
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if initial <= 0:
        raise ValueError(f"initial must be > 0, got {initial}")
    if maximum < initial:
        raise ValueError(f"maximum ({maximum}) must be >= initial ({initial})")
    ceiling = maximum if attempt >= _MAX_EXPONENT else min(maximum, initial * 2.0**attempt)
    return rand() * ceiling
