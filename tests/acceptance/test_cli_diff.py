"""``aeventor diff`` through the installed console script, on sqlite and Postgres: two runs of
one program where a step fails in one (exit 1, the step and its log lines shown, without
timestamps, pids or run ids), two runs that do not differ (exit 0), and ``--json``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import aeventor as evr
from tests.acceptance.cli import cli
from tests.acceptance.steps import check, prepare


def run(store: str, logs: Path, flag: Path) -> str:
    ev = evr.Eventor(name="checked", store=store, log_dir=logs)
    go = ev.add_event("go")
    ready = ev.add_event("ready")
    ev.add_step("prepare", func=prepare, triggers={evr.StepStatus.success: (ready,)})
    ev.add_step("check", func=check, args=(str(flag),))
    ev.add_assoc(go, "prepare")
    ev.add_assoc(ready, "check")
    ev.trigger_event(go, 1)
    return ev.run_sync().run_id


VOLATILE = re.compile(r"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d|pid[= ]\d|\b[0-9a-f]{32}\b")


def test_a_failed_step_is_what_differs(cli_store: str, tmp_path: Path) -> None:
    logs, flag = tmp_path / "logs", tmp_path / "fail"
    good = run(cli_store, logs, flag)
    again = run(cli_store, logs, flag)
    flag.touch()
    bad = run(cli_store, logs, flag)

    proc = cli("diff", good[:8], bad[:8], "--store", cli_store)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:5] == [
        f"a: run {good} of checked: success",
        f"b: run {bad} of checked: failure",
        "STEP        A        B",
        "prepare[1]  success  success",
        "check[1]    success  failure  differs",
    ]
    diff = lines[5:]
    assert not [line for line in diff if VOLATILE.search(line)], diff
    assert "--- a/program.log" in diff and "+++ b/check.1.log" in diff
    assert "-<time> INFO [pid=<pid>] step check[1] success" in diff
    assert (
        "+<time> ERROR [pid=<pid>] step check[1] failure: RuntimeError: " + (f"{flag} says fail")
        in diff
    )
    assert f"+RuntimeError: {flag} says fail" in diff
    # prepare's log (its pid and the time in every run) does not differ once normalised.
    assert not any("prepare.1.log" in line for line in diff)

    proc = cli("diff", good, again, "--store", cli_store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "no differences"

    proc = cli("diff", good, bad, "--store", cli_store, "--json")
    assert proc.returncode == 1, proc.stderr
    found = json.loads(proc.stdout)
    assert found["differs"] is True and found["logs_missing"] is None
    assert (found["first"]["run_id"], found["second"]["run_id"]) == (good, bad)
    assert [(s["step"], s["first"], s["second"], s["differs"]) for s in found["steps"]] == [
        ("prepare", "success", "success", False),
        ("check", "success", "failure", True),
    ]
    assert sorted(found["logs"]) == ["check.1.log", "program.log"]
    assert (
        json.loads(cli("diff", good, again, "--store", cli_store, "--json").stdout)["differs"]
        is False
    )


def test_logs_that_are_gone_are_not_compared(cli_store: str, tmp_path: Path) -> None:
    logs, flag = tmp_path / "logs", tmp_path / "fail"
    first, second = run(cli_store, logs, flag), run(cli_store, logs, flag)
    gone = logs / "checked" / second
    shutil.rmtree(gone)
    proc = cli("diff", first, second, "--store", cli_store)
    assert proc.returncode == 0, proc.stderr
    note = f"logs not compared: run {second} has no log directory {str(gone)!r}; pass --log-dir DIR"
    assert proc.stdout.splitlines()[-2:] == [note, "no differences"]
