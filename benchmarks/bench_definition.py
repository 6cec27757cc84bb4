"""Time to define a large program and build it (validate, assign every step's host).

Two shapes, through the public API only (so the same script times older versions too):

- a chain of 4,000 steps defined last-first, where only the first step names a host and
  every other step inherits it from the step before;
- a fan-out of 10,000 steps from one event, inheriting the host of the step that fires it.

Each is defined with ``Eventor(mode="distributed")``, then ``ev.program`` is read (which
validates and assigns hosts), then read 100 times more. Beside each, in the same run, its
floor: the same steps as plain dicts (name, host, trigger, association) and one linear pass
that gives each its host; the ratio is the engine's total over that floor.

Run: ``.venv/bin/python -m benchmarks.bench_definition`` (``--chain N``, ``--fan-out N``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import aeventor as evr
from benchmarks._common import machine

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


def floor(n: int, *, chain: bool) -> float:
    """Seconds to hold ``n`` steps as plain dicts and give each its host in one pass."""
    began = time.perf_counter()
    steps = {
        f"s{i}": {
            "name": f"s{i}",
            "host": "h1" if i == 0 or not chain else None,
            "triggers": {"success": f"e{i + 1}"} if chain else {},
        }
        for i in range(n)
    }
    fired_by = {f"e{i}": [f"s{i}"] for i in range(n)} if chain else {"go": list(steps)}
    if chain:
        host = None
        for i in range(n):
            step = steps[f"s{i}"]
            host = step["host"] = step["host"] or host
    else:
        for name in fired_by["go"]:
            steps[name]["host"] = "h1"
    assert all(step["host"] == "h1" for step in steps.values())
    return time.perf_counter() - began


def measure(label: str, define: Callable[[int], evr.Eventor], n: int, *, chain: bool) -> None:
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
    floors = sorted(floor(n, chain=chain) for _ in range(5))
    base = floors[len(floors) // 2]
    print(
        f"{label:<28} define {defined - began:7.3f}s   program (validate + hosts) "
        f"{built - defined:7.3f}s   total {built - began:7.3f}s   100 more reads "
        f"{reread - built:7.3f}s"
    )
    print(
        f"{'  floor: plain dicts + pass':<28} {base:7.4f}s (median of 5)   "
        f"total / floor {(built - began) / base:6.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=4_000)
    parser.add_argument("--fan-out", type=int, default=10_000)
    args = parser.parse_args()
    evr.Eventor  # noqa: B018 - import the lazily loaded modules before anything is timed
    print("\n".join(machine()))
    print()
    measure(f"chain {args.chain:,} last-first", define_chain, args.chain, chain=True)
    measure(f"fan-out {args.fan_out:,}", define_fan_out, args.fan_out, chain=False)


if __name__ == "__main__":
    main()
