"""``aeventor watch`` through the installed console script, on sqlite and Postgres: one
plain line per change when stdout is not a terminal, the final status line and show's exit
codes; Ctrl-C (SIGINT) of ``watch`` and of ``submit --wait`` says the run goes on, in one
line, and exits 130."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

from tests.acceptance import gated
from tests.acceptance.cli import AEVENTOR, cli, finish, first_line, start
from tests.acceptance.test_cli_queries import make_run, submit_runs


async def test_watch_a_run_to_its_end(cli_store: str, tmp_path: Path) -> None:
    run, run_id, gate = await gated.start(cli_store, tmp_path)
    try:
        watch = await start("watch", run_id[:8], "--store", cli_store)
        as_json = await start("watch", run_id, "--store", cli_store, "--json")
        line = await first_line(watch, "watch's first line")
        change = json.loads(await first_line(as_json, "watch --json's first line"))
        assert (change["run_id"], change["status"], change["total"]) == (run_id, "running", 2)
        assert [r["step"] for r in change["running"]][-1] == "wait"
        assert re.fullmatch(
            r"[01]/2 step runs ended; running: (first\[1\] .*, )?wait\[1\] pid \d+ for \S+\n",
            line,
        ), line
        await gated.open_gate(gate)
        code, out, err = await finish(watch, "watch to end with the run")
        json_code, json_out, _ = await finish(as_json, "watch --json to end with the run")
    finally:
        await gated.end(run, gate)
    assert (code, err) == (0, "")
    *progress, final = out.splitlines()
    assert all(" step runs ended; running: " in p for p in progress)
    assert re.fullmatch(rf"run {run_id} of gated: success after \S+", final), final
    ended = json.loads(json_out.splitlines()[-1])
    assert json_code == 0 and (ended["run_id"], ended["status"]) == (run_id, "success")
    assert sorted(s["step"] for s in ended["steps"]) == ["first", "wait"]

    # A run that has ended: its status line at once, with show's exit codes.
    proc = cli("watch", run_id, "--store", cli_store)
    assert (proc.returncode, proc.stdout.splitlines()) == (0, [final])
    failed = await asyncio.to_thread(make_run, cli_store, tmp_path, "nightly", _bad)
    proc = cli("watch", failed, "--store", cli_store)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"run {failed} of nightly: failure after ")
    assert "(step only[1] failed and fires no failure trigger)" in proc.stdout


async def _bad() -> None:
    raise RuntimeError("boom")


async def test_ctrl_c_stops_watching_and_the_run_goes_on(cli_store: str, tmp_path: Path) -> None:
    run, run_id, gate = await gated.start(cli_store, tmp_path)
    try:
        watch = await start("watch", run_id, "--store", cli_store)
        await first_line(watch, "watch's first line")
        watch.send_signal(signal.SIGINT)
        code, _, err = await finish(watch, "watch to stop on SIGINT")
        assert (code, err) == (
            130,
            f"stopped watching; run {run_id} goes on (aeventor show {run_id})\n",
        )
        # It does go on.
        assert cli("show", run_id, "--store", cli_store).returncode == 4
    finally:
        code, _ = await gated.end(run, gate)
    assert code == 0


async def test_ctrl_c_of_submit_wait(cli_store: str, tmp_path: Path) -> None:
    await asyncio.to_thread(submit_runs, cli_store, tmp_path, "e" * 32)  # registers `queued`
    proc = await asyncio.create_subprocess_exec(
        AEVENTOR,
        "submit",
        "--program",
        "queued",
        "--trigger",
        "go:1",
        "--wait",
        "--store",
        cli_store,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **{k: v for k, v in os.environ.items() if k != "AEVENTOR_STORE"},
            "AEVENTOR_CLUSTER_KEY": "k" * 32,
        },
    )
    run_id = (await first_line(proc, "submit's run id")).strip()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)
    proc.send_signal(signal.SIGINT)  # no agent runs it: it would wait forever
    code, out, err = await finish(proc, "submit --wait to stop on SIGINT")
    assert (code, out) == (130, "")
    assert err == f"stopped watching; run {run_id} goes on (aeventor show {run_id})\n"
    assert "Traceback" not in err
