"""The program of the recovery acceptance tests, run as a script (its steps are found by path).

``python recprog.py STORE [--extra] [--recover=RUN] [--force]`` runs it (or recovers a run of
it) and prints the run id; the exit code is 0 on success, 1 on failure, 2 when the program
changed and recovery was refused. Steps append their name to ``$REC_STATE/ran.txt`` as they
start, so a test can tell exactly which processes ran; ``NAME.fail`` in that directory makes
step NAME fail, ``NAME.wait`` makes it wait for ``release`` (writing ``NAME.started`` first).

The program (the design notes' shape): go -> a, b; b's success -> c; a's and c's success
(the derived event ``both``) -> d. ``--extra`` adds a step ``e`` after ``go`` (a changed
program: another version).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aeventor as evr

S = evr.StepStatus.success


def state() -> Path:
    return Path(os.environ["REC_STATE"])


def work(name: str) -> str:
    with open(state() / "ran.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{name}\n")
    if (state() / f"{name}.wait").exists():
        # Written whole or not at all: the test reads it as soon as it exists.
        started = state() / f"{name}.started"
        started.with_suffix(".tmp").write_text(str(os.getpid()))
        started.with_suffix(".tmp").replace(started)
        deadline = time.monotonic() + 120
        while not (state() / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {name} was never released")
            time.sleep(0.02)
    if (state() / f"{name}.fail").exists():
        raise RuntimeError(f"step {name} is broken")
    return name


def build(store: str, *, extra: bool = False) -> evr.Eventor:
    ev = evr.Eventor(name="recprog", store=store, log_dir=state() / "logs", lease=120)
    ev.add_event("go")
    for event in ("a_ok", "b_ok", "c_ok"):
        ev.add_event(event)
    ev.add_event("both", expr=("a_ok", "c_ok"))
    for name in ("a", "b", "c"):
        ev.add_step(name, work, args=[name], triggers={S: (f"{name}_ok",)})
    ev.add_step("d", work, args=["d"])
    ev.add_assoc("go", "a", "b")
    ev.add_assoc("b_ok", "c")
    ev.add_assoc("both", "d")
    if extra:
        ev.add_step("e", work, args=["e"])
        ev.add_assoc("go", "e")
    ev.trigger_event("go", 0)
    return ev


def main(argv: list[str]) -> int:
    store, *rest = argv
    ev = build(store, extra="--extra" in rest)
    recover = next((a.split("=", 1)[1] for a in rest if a.startswith("--recover=")), None)
    try:
        result = asyncio.run(ev.run(recover=recover, force="--force" in rest))
    except evr.ProgramChanged as exc:
        sys.stderr.write(f"refused: {exc}\n")
        return 2
    sys.stdout.write(f"{result.run_id}\n")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
