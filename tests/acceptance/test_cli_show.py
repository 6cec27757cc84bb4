"""``aeventor show`` as a tree through the installed console script, on sqlite and Postgres:
per sequence the events a run fired in firing order, under each the step runs it made ready
(and under a step run the events its outcome fired), derived events under what fired them,
each step run's facts and log; and ``--json`` with the fired events."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aeventor as evr
from tests.acceptance.cli import cli
from tests.acceptance.steps import check, hello, prepare


def derived(store: str, logs: Path, flag: Path) -> str:
    """start -> prepare and hello; prepare's success fires `prepared`; `both` (prepared and
    start) makes check ready; `start` is also associated with event `noted`."""
    ev = evr.Eventor(name="derive", store=store, log_dir=logs)
    start, prepared, noted = ev.add_event("start"), ev.add_event("prepared"), ev.add_event("noted")
    both = ev.add_event("both", expr=(prepared, start))
    ev.add_step("prepare", func=prepare, triggers={evr.StepStatus.success: (prepared,)})
    ev.add_step("hello", func=hello, args=("tree",))
    ev.add_step("check", func=check, args=(str(flag),))
    ev.add_assoc(start, "prepare", "hello", noted)
    ev.add_assoc(both, "check")
    ev.trigger_event(start, "a")
    ev.trigger_event(start, "b")
    return ev.run_sync().run_id


# The tree of one sequence, facts taken out: "(attempt 1, pid 123, started ..., 15ms)".
TREE = """\
sequence {seq}
└── event start
    ├── prepare[{seq}] success -> 1  (…)
    │   ├── log: {logs}/prepare.{seq}.log
    │   └── event prepared
    │       └── event both
    │           └── check[{seq}] success -> 'checked'  (…)
    │               └── log: {logs}/check.{seq}.log
    ├── hello[{seq}] success -> 'tree'  (…)
    │   └── log: {logs}/hello.{seq}.log
    └── event noted"""


def test_show_is_a_tree_of_events_and_step_runs(cli_store: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_id = derived(cli_store, logs, tmp_path / "no-flag")
    run_dir = logs / "derive" / run_id

    proc = cli("show", run_id[:8], "--store", cli_store)
    assert proc.returncode == 0, proc.stderr
    header, created, where, *tree = proc.stdout.splitlines()
    assert header == f"run {run_id} of derive: success"
    assert re.fullmatch(r"  created \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, duration \S+", created)
    assert where == f"  logs: {run_dir}"
    facts = re.compile(r"\(attempt 1, (pid \d+, )?started [\d-]+ [\d:]+, \S+\)")
    shown = "\n".join(facts.sub("(…)", line) for line in tree)
    assert shown == "\n".join(TREE.format(seq=seq, logs=run_dir) for seq in ("a", "b"))

    proc = cli("show", run_id, "--store", cli_store, "--json")
    assert proc.returncode == 0, proc.stderr
    shown_json = json.loads(proc.stdout)
    assert shown_json["log_dir"] == str(run_dir)
    assert shown_json["mode"] == "standalone"
    events = [(e["event"], e["sequence"]) for e in shown_json["events"]]
    assert sorted(events) == sorted(
        (event, seq) for seq in ("a", "b") for event in ("start", "noted", "prepared", "both")
    )
    assert events.index(("start", "a")) < events.index(("noted", "a"))
    assert events.index(("prepared", "a")) < events.index(("both", "a"))
    (check_a,) = (s for s in shown_json["steps"] if (s["step"], s["sequence"]) == ("check", "a"))
    assert check_a["log"] == str(run_dir / "check.a.log")
    assert check_a["result"] == "checked"


def test_show_a_failed_step_under_its_event(cli_store: str, tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    run_id = derived(cli_store, tmp_path / "logs", flag)
    proc = cli("show", run_id, "--store", cli_store)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run {run_id} of derive: failure"
    assert lines[2].startswith("  reason: step check[")
    at = next(i for i, line in enumerate(lines) if "check[a] failure" in line)
    assert lines[at - 1].endswith("└── event both")
    assert lines[at + 1].endswith(f"├── RuntimeError: {flag} says fail")


def test_show_a_pending_delay(cli_store: str) -> None:
    import asyncio

    from aeventor.backends.stores import open_store
    from aeventor.submission import submit

    ev = evr.Eventor(name="later", store=cli_store, mode="distributed")
    go = ev.add_event("go")
    ev.add_step("now", func=hello, args=("now",), host="h1")
    ev.add_step("soon", func=hello, args=("soon",), host="h1")
    ev.add_assoc(go, "now")
    ev.add_assoc(go, "soon", delay=3600)
    run_id = "e" * 32

    async def queue() -> None:
        async with open_store(cli_store, program="later") as db:
            await submit(db, ev.program, [("go", "1")], key=b"k" * 32, run_id=run_id)

    asyncio.run(queue())  # no agent: `now` waits in its queue, `soon` for its delay
    proc = cli("show", run_id, "--store", cli_store)
    assert proc.returncode == 4, proc.stderr
    tree = proc.stdout.splitlines()[3:]
    assert tree[:2] == ["sequence 1", "└── event go"]
    assert tree[2].startswith("    ├── now[1] ready  (attempt 1, on h1)")
    assert re.fullmatch(r"    └── soon\[1\] delayed: due [\d-]+ [\d:]+ UTC", tree[3]), tree[3]
    (delay,) = json.loads(cli("show", run_id, "--store", cli_store, "--json").stdout)["delays"]
    assert (delay["event"], delay["kind"], delay["target"], delay["done"]) == (
        "go",
        "step",
        "soon",
        None,
    )
