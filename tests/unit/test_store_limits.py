"""Store options, value size limits and error classes, without a database.

The stores are built but never opened (no sockets); :class:`InMemoryStore` stands for a
store whose :attr:`~aeventor.dispatch.store.Store.max_value_bytes` is small.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores.base import DEFAULT_STATEMENT_TIMEOUT, retry_transient
from aeventor.backends.stores.mysql import MySQLDatabase
from aeventor.dispatch import Graph
from aeventor.dispatch.store import _fit
from aeventor.exceptions import (
    AuthenticationError,
    ConnectionLost,
    DatabaseError,
    StoreConfigError,
    TransientError,
    ValueTooLarge,
)
from aeventor.program.model import StepStatus
from aeventor.testing import InMemoryStore

PG = "postgresql+asyncpg://app:hunter2@db.internal:5432/prod"


# -- options in the URL and as arguments ---------------------------------------------------


def test_the_statement_timeout_defaults_to_a_minute() -> None:
    assert open_store(PG, program="p").statement_timeout == DEFAULT_STATEMENT_TIMEOUT == 60


def test_the_statement_timeout_comes_from_the_url_and_leaves_it() -> None:
    db = open_store(f"{PG}?statement_timeout=2.5&ssl=require", program="p")
    assert db.statement_timeout == 2.5
    # The driver never sees aeventor's option; it keeps its own.
    assert dict(db.url.query) == {"ssl": "require"}
    assert "statement_timeout" not in repr(db)


def test_an_argument_wins_over_the_url_and_zero_means_none() -> None:
    assert (
        open_store(f"{PG}?statement_timeout=9", program="p", statement_timeout=1).statement_timeout
        == 1
    )
    assert open_store(f"{PG}?statement_timeout=0", program="p").statement_timeout is None
    assert open_store(PG, program="p", statement_timeout=None).statement_timeout is None


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_statement_timeout_that_is_not_seconds_is_refused(value: str) -> None:
    with pytest.raises(
        StoreConfigError, match=rf"statement_timeout='{value}' is not a number"
    ) as info:
        open_store(f"{PG}?statement_timeout={value}", program="p")
    assert "hunter2" not in str(info.value)


# -- what MySQL counts against max_allowed_packet --------------------------------------------


def _mysql(packet: int) -> MySQLDatabase:
    db = open_store("mysql+aiomysql://root@127.0.0.1/db", program="p")
    assert isinstance(db, MySQLDatabase)
    db.max_allowed_packet = packet
    db.max_value_bytes = packet - 100
    db.server = "MariaDB"
    return db


def test_mysql_counts_the_escapes_of_a_value() -> None:
    db = _mysql(1000)
    assert db.value_size('{"a": "b\\n"}') == len('{"a": "b\\n"}') + 5  # 4 quotes, 1 backslash
    assert db.value_size("é") == 2


def test_mysql_refuses_a_statement_beyond_the_packet_before_sending_it() -> None:
    db = _mysql(1000)
    db._check_statement("INSERT INTO t VALUES (%s, %s)", ("x" * 400, 7), executemany=False)
    with pytest.raises(ValueTooLarge, match="max_allowed_packet is 1,000 bytes") as info:
        db._check_statement("INSERT INTO t VALUES (%s)", ('"' * 600,), executemany=False)
    assert info.value.size == len("INSERT INTO t VALUES (%s)") + 1200
    with pytest.raises(ValueTooLarge):
        db._check_statement("INSERT INTO t VALUES (%s)", [("a",), ("x" * 2000,)], executemany=True)


# -- Store.complete never sends what the store cannot take -----------------------------------


def _one_step() -> Graph:
    ev = evr.Eventor(name="one", store=":memory:")
    ev.add_event("start")
    ev.add_step("s0")
    ev.add_assoc("start", "s0")
    return Graph(ev.program)


async def _claimed(store: InMemoryStore, graph: Graph) -> tuple[str, object]:
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("start", "0")])
    [claim] = await store.claim(worker="w", limit=1, run_id=run_id)
    return run_id, claim


async def test_a_result_beyond_the_limit_fails_the_step_naming_both_sizes() -> None:
    store = InMemoryStore()
    store.max_value_bytes = 1000
    graph = _one_step()
    run_id, claim = await _claimed(store, graph)
    await store.complete(graph, claim, status=StepStatus.success, result="x" * 2000)  # type: ignore[arg-type]
    step = (await store.load_result(run_id)).step("s0")
    assert step.status is StepStatus.failure
    assert step.result is None
    assert step.error == (
        "step s0[0]'s result is 2,002 bytes; this store takes at most 1,000 bytes per value: "
        "return less (write large data to a file and return its path)"
    )


async def test_a_result_within_the_limit_is_kept() -> None:
    store = InMemoryStore()
    graph = _one_step()
    value = {"rows": list(range(50))}
    store.max_value_bytes = len(json.dumps(value))
    run_id, claim = await _claimed(store, graph)
    await store.complete(graph, claim, status=StepStatus.success, result=value)  # type: ignore[arg-type]
    step = (await store.load_result(run_id)).step("s0")
    assert (step.status, step.result) == (StepStatus.success, value)


async def test_an_error_text_beyond_the_limit_is_truncated_saying_so() -> None:
    store = InMemoryStore()
    store.max_value_bytes = 1000
    graph = _one_step()
    run_id, claim = await _claimed(store, graph)
    error = "Traceback (most recent call last):\n" + "  frame\n" * 500 + "ValueError: the end"
    await store.complete(graph, claim, status=StepStatus.failure, error=error)  # type: ignore[arg-type]
    recorded = (await store.load_result(run_id)).step("s0").error
    assert recorded is not None
    assert len(recorded.encode()) <= 1000
    assert recorded.startswith("Traceback (most recent call last):")
    assert recorded.endswith("ValueError: the end")
    assert f"the error text is {len(error):,} bytes; this store takes at most 1,000" in recorded


@pytest.mark.parametrize("limit", [60, 200, 5000])
@pytest.mark.parametrize("text", ["é" * 3000, "ascii " * 2000, '"quoted"\n' * 700])
def test_fitting_text_stays_within_the_limit_as_the_store_counts(text: str, limit: int) -> None:
    db = _mysql(limit + 100)
    fitted = _fit(text, limit, db.value_size, "a limit")
    assert db.value_size(fitted) <= limit
    assert "characters cut" in fitted or db.value_size(text) <= limit


def test_fitting_text_that_fits_returns_it() -> None:
    assert _fit("short", 100, len, "a limit") == "short"


# -- which errors the store retries -----------------------------------------------------------


class Store:
    reconnect_deadline = 60.0

    def __init__(self, error: DatabaseError) -> None:
        self.error = error
        self.calls = 0

    def clock(self) -> float:
        return 0.0

    async def sleep(self, delay: float) -> None:
        pass

    @retry_transient
    async def work(self) -> str:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return "done"


@pytest.mark.parametrize(
    ("error", "event"),
    [
        (TransientError("deadlock detected"), "store operation failed transiently; retrying"),
        (ConnectionLost("server closed the connection"), "store unreachable; retrying"),
    ],
)
async def test_transient_errors_are_retried(
    error: DatabaseError, event: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(error)
    assert await store.work() == "done"  # type: ignore[arg-type]
    assert store.calls == 2
    [record] = [r for r in caplog.records if r.name == "aeventor.store"]
    assert record.levelno == logging.WARNING
    assert record.event == event  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "error",
    [AuthenticationError("refused"), ValueTooLarge("too big"), DatabaseError("syntax")],
)
async def test_other_database_errors_are_not_retried(error: DatabaseError) -> None:
    store = Store(error)
    with pytest.raises(type(error)):
        await store.work()  # type: ignore[arg-type]
    assert store.calls == 1


def test_a_lost_connection_is_a_transient_error() -> None:
    assert issubclass(ConnectionLost, TransientError)
    assert not issubclass(AuthenticationError, TransientError)


# -- Alembic's proxies belong to one migration at a time --------------------------------------


async def test_a_cancelled_wait_for_the_alembic_lock_leaves_it_free() -> None:
    """A migration cancelled while it waits for the lock releases it once its thread gets it."""
    from aeventor.backends.stores.migrations import ALEMBIC_LOCK, _alembic_proxies

    entered = asyncio.Event()

    async def migrate() -> None:
        async with _alembic_proxies():
            entered.set()

    assert ALEMBIC_LOCK.acquire(blocking=False)
    try:
        task = asyncio.create_task(migrate())
        await asyncio.sleep(0)  # let it start waiting in its thread
        task.cancel()
        await asyncio.wait([task])
    finally:
        ALEMBIC_LOCK.release()
    assert task.cancelled()
    assert not entered.is_set()
    # Its thread takes the lock and a callback on this loop gives it back.
    assert await asyncio.to_thread(ALEMBIC_LOCK.acquire, True, 10)
    ALEMBIC_LOCK.release()
