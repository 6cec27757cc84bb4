"""Large values on MariaDB/MySQL, through the public API (a standalone run).

The server refuses a statement larger than ``max_allowed_packet`` (16 MiB here) by dropping
the connection, which the driver reports as a lost connection: a 20 MB result was once
retried as one for two minutes while memory grew to a gigabyte. The store reads the limit
when it opens, and a value that cannot fit is never sent: the step fails with an error that
names both sizes and the fix, and the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores import mysql, open_store
from aeventor.exceptions import ValueTooLarge

from ..backends import backend_url
from ..waiting import within

S = evr.StepStatus
#: Beyond the server's max_allowed_packet by this much (16 MiB by default: a 20 MB value).
BEYOND = 3_300_000
# Imported here, not in a test's event loop: importing Alembic reads its plugins' metadata.
BACKEND = mysql


@pytest.fixture(params=[pytest.param("mysql", marks=pytest.mark.mysql)])
def mysql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


async def _limits(url: str) -> tuple[str, int, int]:
    """The server's name, its max_allowed_packet and the store's max_value_bytes."""
    db = open_store(url, program="limits")
    async with db:
        assert isinstance(db, mysql.MySQLDatabase)
        assert db.max_allowed_packet is not None and db.max_value_bytes is not None
        return db.server, db.max_allowed_packet, db.max_value_bytes


def _eventor(url: str, tmp_path: Path, name: str = "sizes") -> evr.Eventor:
    return evr.Eventor(name=name, store=url, log_dir=tmp_path / "logs")


async def produce(size: int) -> str:
    return "x" * size


async def noop() -> None:
    return None


async def test_a_200_kib_result_round_trips(mysql_store: str, tmp_path: Path) -> None:
    ev = _eventor(mysql_store, tmp_path)
    ev.add_step("big", func=produce, args=(200 * 1024,))
    start = ev.add_event("start")
    ev.add_assoc(start, "big")
    ev.trigger_event(start)
    result = await ev.run()
    assert result, result.reason
    assert result.step("big", 0).result == "x" * (200 * 1024)


async def test_a_1000_step_program_registers_and_runs(mysql_store: str, tmp_path: Path) -> None:
    ev = _eventor(mysql_store, tmp_path, name="wide")
    start = ev.add_event("start")
    for i in range(1000):
        ev.add_step(f"step_{i:04d}", func=noop)
    ev.add_assoc(start, *(f"step_{i:04d}" for i in range(1000)))
    ev.trigger_event(start)
    result = await ev.run()
    assert result, result.reason
    assert len(result.steps) == 1000
    assert {s.status for s in result.steps} == {S.success}


async def test_a_result_beyond_the_packet_limit_fails_the_step_quickly_naming_it(
    mysql_store: str, tmp_path: Path
) -> None:
    """A 20 MB result (with the server's default 16 MiB packet) fails its step within
    seconds (it was retried as a lost connection for two minutes), and the run ends."""
    server, packet, per_value = await _limits(mysql_store)
    size = packet + BEYOND
    ev = _eventor(mysql_store, tmp_path)
    ev.add_step("huge", func=produce, args=(size,))
    start = ev.add_event("start")
    ev.add_assoc(start, "huge")
    ev.trigger_event(start)
    started = time.monotonic()
    result = await within(ev.run(), what="the run to end")
    elapsed = time.monotonic() - started

    assert not result
    assert result.status is evr.RunStatus.failure
    step = result.step("huge", 0)
    assert step.status is S.failure
    assert step.result is None
    # The JSON text's size as sent (its two quotes escaped), the server's limit, the fix.
    assert step.error == (
        f"step huge[0]'s result is {size + 4:,} bytes; {server}'s max_allowed_packet is "
        f"{packet:,} bytes (at most {per_value:,} per value): return less (write large data "
        "to a file and return its path), or raise max_allowed_packet on the server"
    )
    assert elapsed < 10


async def test_a_definition_beyond_the_limit_is_refused_naming_it(mysql_store: str) -> None:
    _, packet, _ = await _limits(mysql_store)
    ev = evr.Eventor(name="heavy", store=":memory:")
    ev.add_step("s", func=produce, args=("x" * (packet + BEYOND),))  # arguments are in it
    db = open_store(mysql_store, program="heavy")
    async with db:
        with pytest.raises(ValueTooLarge, match=f"max_allowed_packet is {packet:,} bytes") as info:
            await db.register_program(ev.program)
    assert "program 'heavy''s definition is " in str(info.value)
    assert "define fewer or smaller steps, or raise max_allowed_packet" in str(info.value)
    assert info.value.limit == db.max_value_bytes
