"""Cancel a run at every store transaction it makes, and check what it leaves behind.

Whatever the point of cancellation, the run must end recorded as cancelled (or finished, if
the cancel came after its last transaction) with no step run left ready or active, and
``handle.wait()`` must return that result rather than raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aeventor as evr

S = evr.StepStatus


async def quick() -> str:
    return "ok"


def build(store: str, log_dir: Path) -> evr.Eventor:
    ev = evr.Eventor(name="cancel", store=store, log_dir=log_dir)
    start, mid, end = ev.add_event("start"), ev.add_event("mid"), ev.add_event("end")
    ev.add_step("a", func=quick, triggers={S.success: (mid,), S.active: (end,)})
    ev.add_step("b", func=quick, triggers={S.success: (mid,)})
    ev.add_step("c", command=["true"], triggers={S.complete: (end,)})
    ev.add_step("d", func=quick)
    ev.add_assoc(start, "a", "b")
    ev.add_assoc(mid, "c")
    ev.add_assoc(end, "d")
    ev.trigger_event(start, 1)
    return ev


def count_transactions(db: Any, on_enter: Callable[[int], None]) -> None:
    original = db.transaction

    @asynccontextmanager
    async def counted() -> AsyncIterator[Any]:
        count_transactions.calls += 1  # type: ignore[attr-defined]
        on_enter(count_transactions.calls)  # type: ignore[attr-defined]
        async with original() as conn:
            yield conn

    db.transaction = counted


async def run_cancelled_at(k: int, tmp_path: Path) -> tuple[int, evr.RunResult]:
    ev = build(str(tmp_path / f"store-{k}.db"), tmp_path / "logs")
    async with ev:
        count_transactions.calls = 0  # type: ignore[attr-defined]
        holder: dict[str, evr.RunHandle] = {}

        def on_enter(n: int) -> None:
            if n == k:
                holder["handle"].cancel()

        assert ev._db is not None
        count_transactions(ev._db, on_enter)
        handle = ev.start()
        holder["handle"] = handle
        async with asyncio.timeout(30):
            result = await handle.wait()
        return count_transactions.calls, result  # type: ignore[attr-defined]


async def test_cancel_at_every_transaction_leaves_a_consistent_run(tmp_path: Path) -> None:
    total, first = await run_cancelled_at(10_000, tmp_path)
    assert first, first.reason
    assert total >= 5
    for k in range(1, total + 1):
        _, result = await run_cancelled_at(k, tmp_path)
        assert result.status in (evr.RunStatus.cancelled, evr.RunStatus.success), (k, result)
        pending = [s for s in result.steps if s.status in (S.ready, S.active)]
        assert pending == [], (k, pending)
        if result.status is evr.RunStatus.cancelled:
            assert result.reason == "cancelled" or result.steps == (), (k, result.reason)
