"""Handles without races: what a handle does right after start() or attach(), what giving up
on a wait does, and what leaving ``async with Eventor`` does while a run is live."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

import aeventor as evr
from aeventor.backends.stores.base import Database

from .helpers import DEADLINE, steps_of, wait_event, wait_until

MakeEventor = Callable[..., evr.Eventor]


def _gated(make_eventor: MakeEventor, **kwargs: object) -> tuple[evr.Eventor, asyncio.Event]:
    """A program whose one step waits until the returned event is set."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def gate() -> str:
        entered.set()
        await release.wait()
        return "opened"

    ev = make_eventor(**kwargs)
    start = ev.add_event("start")
    extra = ev.add_event("extra")
    ev.add_step("gate", func=gate)
    ev.add_step("extra_step", func=_noop)
    ev.add_assoc(start, "gate")
    ev.add_assoc(extra, "extra_step")
    ev.trigger_event(start)
    ev.entered = entered  # type: ignore[attr-defined]
    return ev, release


async def _noop() -> str:
    return "noop"


async def _status(db: Database, run_id: str) -> evr.RunStatus:
    return await db.run_status(run_id)


async def test_trigger_event_right_after_start(make_eventor: MakeEventor) -> None:
    ev, release = _gated(make_eventor)
    handle = ev.start()
    await handle.trigger_event("extra", 3)  # before the run's first transaction committed
    release.set()
    async with asyncio.timeout(DEADLINE):
        result = await handle.wait()
    assert result, result.reason
    assert ("extra_step", "3", "success") in steps_of(result)


async def test_attach_then_cancel_at_once_cancels_the_run(
    make_eventor: MakeEventor, store_url: str, store_db: Database
) -> None:
    ev, _release = _gated(make_eventor, lease=3.0)
    handle = ev.start()
    await wait_event(ev.entered, what="the gate step to start")  # type: ignore[attr-defined]

    attached = evr.attach(store_url, handle.run_id)
    attached.cancel()  # before the attached handle opened its store
    async with asyncio.timeout(DEADLINE):
        cancelled = await attached.wait()
        result = await handle.wait()  # the run's own worker terminates the step

    assert cancelled.status is evr.RunStatus.cancelled, cancelled
    assert result.status is evr.RunStatus.cancelled, result
    assert result.step("gate").status is evr.StepStatus.cancelled
    assert await _status(store_db, handle.run_id) is evr.RunStatus.cancelled


async def test_giving_up_on_an_attached_wait_leaves_the_run_alone(
    make_eventor: MakeEventor, store_url: str, store_db: Database
) -> None:
    ev, release = _gated(make_eventor)
    handle = ev.start()
    await wait_event(ev.entered, what="the gate step to start")  # type: ignore[attr-defined]

    attached = evr.attach(store_url, handle.run_id)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await attached.wait()
    # The follower task itself torn down (as at the loop's end): still not a cancel.
    attached._task.cancel()
    await asyncio.gather(attached._task, return_exceptions=True)

    release.set()
    async with asyncio.timeout(DEADLINE):
        result = await handle.wait()
    assert result, result.reason
    assert await _status(store_db, handle.run_id) is evr.RunStatus.success


async def test_attach_through_an_open_eventor_reuses_its_store(make_eventor: MakeEventor) -> None:
    ev, release = _gated(make_eventor)
    async with ev:
        store = ev._db
        handle = ev.start()
        await wait_event(ev.entered, what="the gate step to start")  # type: ignore[attr-defined]
        attached = ev.attach(handle.run_id)
        await attached.trigger_event("extra", 5)
        release.set()
        async with asyncio.timeout(DEADLINE):
            followed = await attached.wait()
        assert ev._db is store
    assert followed, followed.reason
    assert ("extra_step", "5", "success") in steps_of(followed)


async def test_leaving_async_with_waits_for_started_runs(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    ev, release = _gated(make_eventor)
    async with ev:
        handle = ev.start()
        await wait_event(ev.entered, what="the gate step to start")  # type: ignore[attr-defined]
        asyncio.get_running_loop().call_soon(release.set)
    # Left normally: the run was waited for, then the store closed.
    assert handle.done()
    result = await handle.wait()
    assert result, result.reason
    assert await _status(store_db, handle.run_id) is evr.RunStatus.success


async def test_leaving_async_with_by_an_error_cancels_started_runs(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    ev, _ = _gated(make_eventor)
    with pytest.raises(RuntimeError, match="boom"):
        async with ev:
            handle = ev.start()
            await wait_event(ev.entered, what="the gate step to start")  # type: ignore[attr-defined]
            raise RuntimeError("boom")
    result = await handle.wait()
    assert result.status is evr.RunStatus.cancelled
    await wait_until(
        lambda: _status(store_db, handle.run_id),
        what="the run to be recorded",
    )
    assert await _status(store_db, handle.run_id) is evr.RunStatus.cancelled
    assert ev._db is None  # closed cleanly
