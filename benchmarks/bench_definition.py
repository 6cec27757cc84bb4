"""Time to define a large program and build it (validate, assign every step's host).

Two shapes, through the public API only (so the same script times older versions too):

- a chain of 4,000 steps defined last-first, where only the first step names a host and
  every other step inherits it from the step before;
- a fan-out of 10,000 steps from one event, inheriting the host of the step that fires it.

Each is defined with ``Eventor(mode="distributed")``, then ``ev.program`` is read (which
validates and assigns hosts), then read 100 times more.

Run: ``.venv/bin/python -m benchmarks.bench_definition`` (``--chain N``, ``--fan-out N``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import aeventor as evr

S = evr.StepStatus


def define_chain(n: int) -> evr.Eventor:
    ev = evr.Eventor(name="chain", store=":memory:", mode="distributed")
    for i in range(n + 1):
        ev.add_event(f"e{i}")
    for i in reversed(range(n)):
        ev.add_step(f"s{i}", host="h1" if i == 0 else None, triggers={S.success: f"e{i + 1}"})
        ev.add_assoc(f"e{i}", f"s{i}")
    return ev


def define_fan_out(n: int) -> evr.Eventor:
    ev = evr.Eventor(name="fan-out", store=":memory:", mode="distributed")
    start, go = ev.add_event("start"), ev.add_event("go")
    root = ev.add_step("root", host="h1", triggers={S.success: go})
    ev.add_assoc(start, root)
    steps = [ev.add_step(f"s{i}") for i in range(n)]
    ev.add_assoc(go, *steps)
    return ev


def measure(label: str, define: Callable[[int], evr.Eventor], n: int) -> None:
    began = time.perf_counter()
    ev = define(n)
    defined = time.perf_counter()
    program = ev.program
    built = time.perf_counter()
    for _ in range(100):
        ev.program  # noqa: B018 - the read is what is timed
    reread = time.perf_counter()
    assert len(program.steps) >= n
    assert all(step.host == "h1" for step in program.steps.values())
    print(
        f"{label:<28} define {defined - began:7.3f}s   program (validate + hosts) "
        f"{built - defined:7.3f}s   total {built - began:7.3f}s   100 more reads "
        f"{reread - built:7.3f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=4_000)
    parser.add_argument("--fan-out", type=int, default=10_000)
    args = parser.parse_args()
    evr.Eventor  # noqa: B018 - import the lazily loaded modules before anything is timed
    measure(f"chain {args.chain:,} last-first", define_chain, args.chain)
    measure(f"fan-out {args.fan_out:,}", define_fan_out, args.fan_out)


if __name__ == "__main__":
    main()
