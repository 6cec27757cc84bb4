"""A chain of 20 no-op Python function steps: warm (forked by the warm pool's zygote) against
fresh interpreters (``executor="process"``) and 20 bare ``python -c pass`` starts.

Each chain is one standalone run (``await Eventor(...).run()``) on a sqlite file in a
temporary directory: step *i*'s success fires the event of step *i+1*. Its time is the run's
whole wall time, the store's opening and the warm pool's zygote start included (the run's
executor starts it as the run begins). The floor is 20 sequential starts of this
interpreter with ``-c pass``; an in-loop chain (``async def`` steps, no process at all)
shows what the engine itself costs per hop. The issue's target: warm chain <= 0.3x the bare
starts. Modes alternate within each repeat, so drift on a shared machine hits them alike.

Run: ``.venv/bin/python -m benchmarks.bench_warm`` (``--steps N``, ``--repeats N``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aeventor as evr
from benchmarks import _steps


async def noop_inloop() -> None:
    """An in-loop step that does nothing."""


def chain(n: int, executor: str, workdir: Path, tag: str) -> evr.Eventor:
    ev = evr.Eventor(
        name=f"chain-{executor}",
        store=f"sqlite:///{workdir / f'{tag}.db'}",
        log_dir=workdir / "logs",
    )
    events = [ev.add_event(f"e{i}") for i in range(n)]
    for i in range(n):
        triggers: dict[evr.StepStatus | str, Any] = (
            {evr.StepStatus.success: (events[i + 1],)} if i + 1 < n else {}
        )
        func = noop_inloop if executor == "inloop" else _steps.noop
        step = ev.add_step(f"s{i}", func, executor=executor, triggers=triggers)
        ev.add_assoc(events[i], step)
    ev.trigger_event(events[0])
    return ev


async def run_chain(n: int, executor: str, workdir: Path, tag: str) -> float:
    ev = chain(n, executor, workdir, tag)
    began = time.perf_counter()
    result = await ev.run()
    elapsed = time.perf_counter() - began
    assert result.ok, result.reason
    assert len(result.steps) == n
    return elapsed


async def bare_starts(n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        assert await proc.wait() == 0
    return time.perf_counter() - began


async def main_async(steps: int, repeats: int) -> None:
    logging.getLogger("aeventor").setLevel(logging.ERROR)
    modes = ("bare", "inloop", "warm", "process")
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="aeventor-bench-warm-") as tmp:
        workdir = Path(tmp)
        for r in range(repeats + 1):  # the first round warms caches up and is dropped
            for mode in modes:
                if mode == "bare":
                    elapsed = await bare_starts(steps)
                else:
                    elapsed = await run_chain(steps, mode, workdir, f"{mode}-{r}")
                if r:
                    times[mode].append(elapsed)
    bare = statistics.median(times["bare"])
    print(
        f"machine   {platform.platform()}, {os.cpu_count()} cpus, Python {sys.version.split()[0]}"
    )
    print(f"chain of {steps} no-op steps, median of {repeats} runs (sqlite file store)")
    print(f"{'mode':<34}{'total ms':>10}{'per step ms':>13}{'x bare':>9}")
    labels = {
        "bare": f"{steps} bare `python -c pass` starts",
        "inloop": "in-loop chain (engine only)",
        "warm": "warm chain (executor='warm')",
        "process": "fresh chain (executor='process')",
    }
    for mode in modes:
        total = statistics.median(times[mode])
        print(
            f"{labels[mode]:<34}{total * 1000:>10.1f}{total * 1000 / steps:>13.2f}"
            f"{total / bare:>9.2f}"
        )
    ratio = statistics.median(times["warm"]) / bare
    verdict = "met" if ratio <= 0.3 else "missed"
    print(f"target warm <= 0.3x bare starts: {ratio:.2f}x, {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main_async(args.steps, args.repeats))


if __name__ == "__main__":
    main()
