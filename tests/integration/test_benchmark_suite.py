"""The benchmark suite (``python -m benchmarks``) still runs: its ``--quick`` sqlite path for
one small benchmark, so that the suite cannot rot between benchmark runs. Nothing about
speed is asserted."""

from __future__ import annotations

import asyncio

from benchmarks.suite import BENCHMARKS, parse_args, run_suite


def test_the_suite_lists_its_benchmarks() -> None:
    assert {"open", "floors", "chain", "fanout", "runs", "idle", "scaleout", "rss"} <= set(
        BENCHMARKS
    )


def test_quick_sqlite_idle_benchmark_prints_its_table_and_target() -> None:
    args = parse_args(
        ["idle", "--quick", "--backends", "sqlite", "--chain-steps", "5", "--idle-rows", "150"]
    )
    lines: list[str] = []
    tables = asyncio.run(run_suite(args, out=lines.append))
    text = "\n".join(lines)
    assert [table.title for table in tables] == [
        "chain of 5 in-loop no-ops beside 150 idle ready step runs of other runs"
    ]
    (row,) = tables[0].rows
    assert row[0] == "sqlite"
    assert "target: sqlite hop with 150 idle rows / empty = " in text
    assert "machine" in text
