"""``aeventor.runs`` and ``aeventor.run_result`` on an open in-memory store: filters, the newest
first, run id prefixes (unique, unknown, shared) and the errors that say what to do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import aeventor as evr
from aeventor.submission import submit
from aeventor.testing import InMemoryStore

KEY = b"k" * 32


async def submitted(*run_ids: str) -> InMemoryStore:
    ev = evr.Eventor(name="queued", store=":memory:", mode="distributed")
    ev.add_event("go")
    ev.add_step("a", host="h1")
    ev.add_assoc("go", "a")
    store = InMemoryStore()
    for run_id in run_ids:
        await submit(store, ev.program, [("go", "0")], key=KEY, run_id=run_id)
    return store


async def test_runs_newest_first_and_filtered() -> None:
    store = await submitted("r1", "r2", "r3")
    assert [r.run_id for r in await evr.runs(store)] == ["r3", "r2", "r1"]
    assert [r.run_id for r in await evr.runs(store, limit=2)] == ["r3", "r2"]
    assert [r.run_id for r in await evr.runs(store, status="running")] == ["r3", "r2", "r1"]
    assert await evr.runs(store, status=evr.RunStatus.success) == []
    assert await evr.runs(store, program="other") == []
    assert len(await evr.runs(store, since=timedelta(minutes=5))) == 3
    # A naive datetime is UTC, as the store keeps times.
    later = datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=5)
    assert await evr.runs(store, since=later) == []
    with pytest.raises(evr.ConfigurationError, match=r"status='done': .* one of running"):
        await evr.runs(store, status="done")
    with pytest.raises(evr.ConfigurationError, match="limit=0"):
        await evr.runs(store, limit=0)


async def test_run_result_by_id_or_unique_prefix() -> None:
    store = await submitted("abc1", "abc2", "abc", "xyz9")
    assert (await evr.run_result(store, "xyz9")).run_id == "xyz9"
    assert (await evr.run_result(store, "xy")).run_id == "xyz9"
    assert (await evr.run_result(store, "abc1")).run_id == "abc1"
    # A whole id wins over the longer ids it is a prefix of.
    result = await evr.run_result(store, "abc")
    assert (result.run_id, result.status, [s.step for s in result.steps]) == (
        "abc",
        evr.RunStatus.running,
        ["a"],
    )
    with pytest.raises(evr.AmbiguousRunId, match=r"prefix 'ab' matches several runs \(") as info:
        await evr.run_result(store, "ab")
    assert all(run_id in str(info.value) for run_id in ("abc1", "abc2", "abc"))
    with pytest.raises(evr.DatabaseError, match=r"no run 'q'.*`aeventor runs` lists the runs"):
        await evr.run_result(store, "q")
    with pytest.raises(evr.ConfigurationError, match="give a run id"):
        await evr.run_result(store, "")
