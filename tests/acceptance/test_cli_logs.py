"""``aeventor logs`` through the installed console script, on sqlite and Postgres: a run's
program log, a step's log (its only sequence, or STEP.SEQ), ``-f`` following a live run to
its end, ``--log-dir``, and the errors: a missing log file, an ambiguous step, a distributed
run's logs on its agents' hosts."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aeventor as evr
from tests.acceptance import gated
from tests.acceptance.cli import cli, finish, first_line, start
from tests.acceptance.steps import hello


def two_sequences(store: str, logs: Path) -> str:
    ev = evr.Eventor(name="greet", store=store, log_dir=logs)
    go = ev.add_event("go")
    ev.add_step("hello", func=hello, args=("world",))
    ev.add_assoc(go, "hello")
    ev.trigger_event(go, 1)
    ev.trigger_event(go, 2)
    return ev.run_sync().run_id


def test_program_and_step_logs(cli_store: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_id = two_sequences(cli_store, logs)

    proc = cli("logs", run_id[:8], "--store", cli_store)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"run {run_id} of program greet started" in lines[0]
    assert any(line.endswith("event go[2] triggered") for line in lines)
    assert lines[-1].endswith(f"run {run_id} ended: success")

    proc = cli("logs", run_id, "hello.2", "--store", cli_store)
    assert (proc.returncode, proc.stdout) == (0, "hello world\n"), proc.stderr

    proc = cli("logs", run_id, "hello", "--store", cli_store)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"aeventor: step 'hello' ran for sequences 1, 2 in run {run_id}: name one as hello.SEQ\n"
    )

    # Logs moved elsewhere: --log-dir is the Eventor's log_dir there.
    moved = tmp_path / "moved"
    shutil.move(logs, moved)
    missing = logs / "greet" / run_id / "hello.1.log"
    proc = cli("logs", run_id, "hello.1", "--store", cli_store)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"aeventor: no log of step run hello[1] at {str(missing)!r}; if the run's logs "
        "were moved, pass --log-dir DIR\n"
    )
    proc = cli("logs", run_id, "hello.1", "--store", cli_store, "--log-dir", str(moved))
    assert (proc.returncode, proc.stdout) == (0, "hello world\n"), proc.stderr


def test_a_distributed_run_names_its_hosts(cli_store: str) -> None:
    from aeventor.backends.stores import open_store
    from aeventor.submission import submit

    ev = evr.Eventor(name="spread", store=cli_store, mode="distributed")
    go = ev.add_event("go")
    ev.add_step("a", func=hello, args=("a",), host="web1")
    ev.add_step("b", func=hello, args=("b",), host="db1")
    ev.add_assoc(go, "a", "b")
    run_id = "d" * 32

    async def queue() -> None:
        async with open_store(cli_store, program="spread") as db:
            await submit(db, ev.program, [("go", "1")], key=b"k" * 32, run_id=run_id)

    asyncio.run(queue())  # no agent: both step runs wait in their hosts' queues
    proc = cli("logs", run_id, "a", "--store", cli_store)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"aeventor: run {run_id} is distributed: its logs are on its agents' hosts "
        "(db1, web1); read them there with --log-dir DIR, the agent's log directory\n"
    )


async def test_follow_a_live_run_to_its_end(cli_store: str, tmp_path: Path) -> None:
    run, run_id, gate = await gated.start(cli_store, tmp_path)
    try:
        step = await start("logs", run_id, "wait", "-f", "--store", cli_store)
        program = await start("logs", run_id[:10], "--follow", "--store", cli_store)
        assert await first_line(step, "logs -f's first line") == "waiting for the gate\n"
        assert "started" in await first_line(program, "the program log's first line")
        await gated.open_gate(gate)
        code, out, err = await finish(step, "logs -f to end with the run")
        assert (code, out, err) == (0, "gate open\n", "")
        code, out, err = await finish(program, "logs -f of program.log to end with the run")
        assert (code, err) == (0, "")
        assert out.splitlines()[-1].endswith(f"run {run_id} ended: success")
    finally:
        code, out = await gated.end(run, gate)
    assert code == 0 and out.splitlines()[-1] == run_id
    # Once the run ended, -f prints the whole log and returns.
    proc = await asyncio.to_thread(cli, "logs", run_id, "wait", "-f", "--store", cli_store)
    assert (proc.returncode, proc.stdout) == (0, "waiting for the gate\ngate open\n")
