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

S = evr.StepStatus
BIG = 20_000_000
# Imported here, not in a test's event loop: importing Alembic reads its plugins' metadata.
BACKEND = mysql


@pytest.fixture(params=[pytest.param("mysql", marks=pytest.mark.mysql)])
def mysql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


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


async def test_a_20_mb_result_fails_the_step_quickly_naming_the_limit(
    mysql_store: str, tmp_path: Path
) -> None:
    ev = _eventor(mysql_store, tmp_path)
    ev.add_step("huge", func=produce, args=(BIG,))
    start = ev.add_event("start")
    ev.add_assoc(start, "huge")
    ev.trigger_event(start)
    started = time.monotonic()
    result = await ev.run()
    elapsed = time.monotonic() - started

    assert not result
    assert result.status is evr.RunStatus.failure
    step = result.step("huge", 0)
    assert step.status is S.failure
    assert step.result is None
    assert step.error is not None
    # The JSON text's size as sent (its two quotes escaped), the server's limit, the fix.
    assert "step huge[0]'s result is 20,000,004 bytes" in step.error
    assert "MariaDB's max_allowed_packet is 16,777,216 bytes" in step.error
    assert "return less" in step.error and "raise max_allowed_packet" in step.error
    assert elapsed < 10


async def test_a_definition_beyond_the_limit_is_refused_naming_it(mysql_store: str) -> None:
    ev = evr.Eventor(name="heavy", store=":memory:")
    ev.add_step("s", func=produce, args=("x" * BIG,))  # arguments are in the definition
    db = open_store(mysql_store, program="heavy")
    async with db:
        with pytest.raises(ValueTooLarge, match="max_allowed_packet is 16,777,216") as info:
            await db.register_program(ev.program)
    assert "program 'heavy''s definition is 20,0" in str(info.value)
    assert info.value.limit == db.max_value_bytes
