"""Write access to the database alone cannot make an agent run a step; steps see no secrets.

Real agents (``python -m aeventor.agent`` subprocesses) on Postgres and MariaDB. The tests
write to the step-run table behind the submitter's back, as someone holding the database but
not the cluster key would: rows inserted into a finished run, rows copied from a signed one,
a ready row re-routed to another host. Each such row is refused (recorded failed with the
reason, logged as ``step.refused``), nothing runs (the step appends a line to a file each
time it runs), and the agent goes on serving the next good run.

Then what a step sees of its agent's environment: only the allow-list, what ``--pass-env``
names and its own variables; never the cluster key, the store's URL or its password.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import aeventor as evr
from aeventor import signing
from aeventor.backends.stores import schema as _schema
from tests.backends import backend_url

from . import distprog
from .agents import (
    ALLOW,
    CLUSTER_KEY,
    OTHER_KEY,
    Agents,
    execute,
    read_text,
    run_rows,
    select_rows,
    subprocess_env,
    wait_until,
    within,
)

pytestmark = pytest.mark.timeout(120)

#: What a refused step's error starts with.
REFUSED = re.compile(r"^refused by worker \S+: step run \d+ ")
step_run = _schema.step_run


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh shared store: Postgres, then MariaDB."""
    with backend_url(request.param, tmp_path) as url:
        yield url


def counting(store: str, directory: Path, *, host: str = "s1") -> evr.Eventor:
    """One step, ``count`` on ``host``, that appends a line to ``directory/<seq>.tally``."""
    ev = evr.Eventor(name="tamper", store=store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    count = ev.add_step(
        "count",
        host=host,
        func=distprog.tally,
        kwargs={"directory": str(directory)},
        sequence_arg_name="sequence",
    )
    ev.add_assoc(start, count)
    return ev


async def run_counting(store: str, directory: Path, sequence: str) -> evr.RunResult:
    ev = counting(store, directory)
    ev.trigger_event("start", sequence)
    result = await within(ev.run(), what=f"the counting run of sequence {sequence}")
    assert result.ok, [(s.step, s.error) for s in result]
    return result


def tally(directory: Path, sequence: str) -> list[str]:
    """The lines the step of ``sequence`` wrote: one per execution."""
    return read_text(directory / f"{sequence}.tally").splitlines()


async def rows_of(store: str, *where: Any) -> list[sa.Row[Any]]:
    return await select_rows(store, sa.select(step_run).where(*where).order_by(step_run.c.id))


def new_row(**values: Any) -> dict[str, Any]:
    """A step-run row as an attacker writes it: valid-looking, ready to be claimed."""
    row = {
        "step": "count",
        "recovery": 0,
        "attempt": 1,
        "status": "ready",
        "host": "s1",
        "queue": "s1",
        "mac": None,
        "created": datetime.now(UTC),
    }
    row.update(values)
    return row


async def wait_ended(store: str, ids: list[int]) -> list[sa.Row[Any]]:
    """Wait until the step runs ``ids`` have ended; return them."""
    rows: list[sa.Row[Any]] = []

    async def ended() -> bool:
        nonlocal rows
        rows = await rows_of(store, step_run.c.id.in_(ids))
        return len(rows) == len(ids) and all(r.ended is not None for r in rows)

    await wait_until(ended, what=f"step runs {ids} to be recorded")
    return rows


def check_refused(rows: list[sa.Row[Any]], reason: str) -> None:
    for row in rows:
        assert row.status == "failure", row
        assert row.error is not None and REFUSED.match(row.error), row.error
        assert reason in row.error, row.error
        assert row.pid is None and row.result is None, row


# -- inserted, copied and re-routed rows -------------------------------------------------------


async def test_rows_inserted_into_a_finished_run_are_refused(
    store: str, agents: Agents, tmp_path: Path
) -> None:
    agent = await agents.start(store, "s1")
    first = await run_counting(store, tmp_path, "1")
    assert len(tally(tmp_path, "1")) == 1
    version = counting(store, tmp_path).program.version

    def forged(attempt: int) -> str | None:
        # No MAC, made-up ones, and a real HMAC made with another key.
        return [
            None,
            "0" * 64,
            "f" * 63 + "é",
            signing.step_run_mac(
                OTHER_KEY.encode(),
                run_id=first.run_id,
                version=version,
                step="count",
                sequence="1",
                recovery=0,
                attempt=attempt,
                host="s1",
                queue="s1",
            ),
        ][attempt % 4]

    await execute(
        store,
        step_run.insert().values(
            [
                new_row(run_id=first.run_id, sequence="1", attempt=attempt, mac=forged(attempt))
                for attempt in range(2, 13)
            ]
        ),
    )
    inserted = [r.id for r in await rows_of(store, step_run.c.attempt >= 2)]
    assert len(inserted) == 11

    # The agent goes on serving: a later good run (whose NOTIFY wakes it on Postgres).
    await run_counting(store, tmp_path, "2")
    rows = await wait_ended(store, inserted)

    check_refused([r for r in rows if r.mac is None], "carries no MAC")
    check_refused([r for r in rows if r.mac is not None], "MAC does not verify")
    assert len(tally(tmp_path, "1")) == 1  # never executed again
    assert len(tally(tmp_path, "2")) == 1
    refused = agent.records("step.refused")
    assert sorted(r["run_id"] for r in refused) == [first.run_id] * 11, agent.log()
    assert all("MAC" in r["reason"] for r in refused), refused
    # The finished run stays as it ended.
    (run,) = [r for r in await run_rows(store) if r.id == first.run_id]
    assert run.status == "success"
    assert agent.proc.returncode is None


async def test_rows_copied_from_a_signed_one_are_refused(
    store: str, agents: Agents, tmp_path: Path
) -> None:
    agent = await agents.start(store, "s1")
    first = await run_counting(store, tmp_path, "1")
    second = await run_counting(store, tmp_path, "2")
    (original,) = await rows_of(store, step_run.c.run_id == first.run_id)
    assert original.mac is not None

    def copy(**change: Any) -> dict[str, Any]:
        values = {
            name: getattr(original, name)
            for name in ("run_id", "step", "sequence", "recovery", "attempt", "host", "queue")
        }
        return new_row(**{**values, "mac": original.mac, **change})

    await execute(
        store,
        step_run.insert().values(
            [
                copy(attempt=2),
                copy(recovery=1),
                copy(sequence="copied"),
                copy(run_id=second.run_id),  # sequence "1" is not second's
            ]
        ),
    )
    # Found by their MAC whatever their status: the agent may already be refusing them.
    copies = [
        r.id
        for r in await rows_of(store, step_run.c.id != original.id, step_run.c.mac == original.mac)
    ]
    assert len(copies) == 4

    await run_counting(store, tmp_path, "3")
    rows = await wait_ended(store, copies)

    check_refused(rows, "MAC does not verify")
    assert [len(tally(tmp_path, s)) for s in ("1", "2", "3", "copied")] == [1, 1, 1, 0]
    assert len(agent.records("step.refused")) == 4, agent.log()


@pytest.mark.parametrize("reroute", ["host-and-queue", "queue"])
async def test_a_ready_row_rerouted_to_another_host_is_refused(
    store: str, agents: Agents, tmp_path: Path, reroute: str
) -> None:
    s1 = await agents.start(store, "s1")
    far_dir = tmp_path / "far"
    far_dir.mkdir()
    # A step of host s2, whose agent is not running: its row waits, ready, in s2's queue.
    ev = counting(store, far_dir, host="s2")
    ev.trigger_event("start", "far")
    async with ev:
        run_id = await ev.submit()
    (row,) = await rows_of(store, step_run.c.run_id == run_id)
    assert (row.status, row.host, row.queue) == ("ready", "s2", "s2")

    # Re-routed to s1's agent.
    values = {"queue": "s1", "host": "s1"} if reroute == "host-and-queue" else {"queue": "s1"}
    await execute(store, step_run.update().where(step_run.c.id == row.id).values(**values))
    await run_counting(store, tmp_path, "wake")
    (refused,) = await wait_ended(store, [row.id])

    check_refused([refused], "re-routed")
    assert tally(far_dir, "far") == []
    result = await within(evr.attach(store, run_id).wait(), what="the tampered run")
    assert result.status is evr.RunStatus.failure, result
    assert "re-routed" in (result.reason or ""), result.reason
    (logged,) = s1.records("step.refused")
    assert logged["run_id"] == run_id and "re-routed" in logged["reason"], logged


# -- what a step sees ---------------------------------------------------------------------------

#: The agent's variables a step inherits without --pass-env (besides LC_*).
BASE = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM"}
EVENTOR_VARS = {
    "EVENTOR_RUN_ID",
    "EVENTOR_PROGRAM",
    "EVENTOR_STEP_NAME",
    "EVENTOR_STEP_SEQUENCE",
    "EVENTOR_STEP_RECOVERY",
    "EVENTOR_STEP_ATTEMPT",
    "EVENTOR_LOGGER_NAME",
    "EVENTOR_HOST",
}
PASSWORD = "s3cret-pw-7f1c"
#: The agent's own variables, beside the cluster key (subprocess_env).
AGENT_EXTRA = {
    "AEVENTOR_KEY": "fernet-key-of-the-store-passwords",
    "AEVENTOR_KEY_FILE": "/nonexistent/aeventor/key",
    "AEVENTOR_CLUSTER_KEY_FILE": "/nonexistent/aeventor/cluster.key",
    "PGPASSWORD": PASSWORD,
    "AGENT_PRIVATE": "not for steps",
    "PROJECT_ROOT": "/srv/project",
    "PROJECT_MODE": "fast",
    "LC_TIME": "C",
}


def with_password(store: str) -> str:
    """The store URL with a password (Postgres trusts the tests' connections: it is not
    checked); MariaDB's root has none, so its URL stays as it is."""
    if store.startswith("postgresql"):
        return store.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    return store


def env_lines(log: str) -> dict[str, str]:
    """``env``'s output (one NAME=value a line) as a dict."""
    found = {}
    for line in log.splitlines():
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            found[name] = value
    return found


def check_no_secrets(env: Mapping[str, str], *, store: str) -> None:
    text = "\n".join(f"{k}={v}" for k, v in env.items())
    for secret in (CLUSTER_KEY, PASSWORD, store, AGENT_EXTRA["AEVENTOR_KEY"], "not for steps"):
        assert secret not in text, (secret, env)
    assert not {k for k in env if k.startswith("AEVENTOR_")}, env


async def test_steps_see_only_allowed_variables_and_what_pass_env_names(
    store: str, agents: Agents, tmp_path: Path
) -> None:
    url = with_password(store)
    agent = await agents.start(
        url,
        "s1",
        allow=(*ALLOW, "env"),
        env=AGENT_EXTRA,
        args=["--pass-env", "PROJECT_*", "--pass-env", "AEVENTOR_CLUSTER_KEY*"],
    )
    # Asked to pass a secret, the agent says it will not.
    (warning,) = agent.records("agent.secret_not_passed")
    assert warning["pattern"] == "AEVENTOR_CLUSTER_KEY*", warning
    ev = evr.Eventor(name="envs", store=store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    ev.add_assoc(
        start,
        ev.add_step("environment", host="s1", func=distprog.environment, env={"OWN_VAR": "own"}),
        ev.add_step("printenv", host="s1", command=["env"]),
    )
    ev.trigger_event(start)

    result = await within(ev.run(), what="the run printing its environment")

    assert result.ok, [(s.step, s.error) for s in result]
    agent_env = subprocess_env(CLUSTER_KEY, **AGENT_EXTRA)
    inherited = {
        k
        for k in agent_env
        if k in BASE or k.startswith("LC_") or fnmatch.fnmatchcase(k, "PROJECT_*")
    }
    assert {"PATH", "HOME", "LC_TIME", "PROJECT_ROOT", "PROJECT_MODE"} <= inherited
    function_env = result.step("environment").result
    # Python coerces a C locale to UTF-8 by setting LC_CTYPE (PEP 538): not the agent's. A
    # function step also gets its channel to its worker (a descriptor number).
    expected = inherited | EVENTOR_VARS | {"OWN_VAR", "EVENTOR_CHANNEL_FD"}
    assert function_env.keys() - {"LC_CTYPE"} == expected - {"LC_CTYPE"}, function_env
    assert function_env["PROJECT_ROOT"] == "/srv/project"
    assert function_env["EVENTOR_HOST"] == "s1"
    check_no_secrets(function_env, store=url)
    # The agent had PYTHONPATH (the checkout) and AGENT_PRIVATE: not passed.
    assert "PYTHONPATH" not in function_env and "AGENT_PRIVATE" not in function_env
    (log,) = (agents.log_dir / "steps").rglob("printenv*.log")
    command_env = env_lines(read_text(log))
    assert command_env.keys() == inherited | EVENTOR_VARS, command_env
    check_no_secrets(command_env, store=url)


async def test_standalone_steps_inherit_the_environment_but_the_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AEVENTOR_CLUSTER_KEY", CLUSTER_KEY)
    monkeypatch.setenv("AEVENTOR_KEY", AGENT_EXTRA["AEVENTOR_KEY"])
    monkeypatch.setenv("USERS_OWN", "kept")
    ev = evr.Eventor(name="standalone_env", store=str(tmp_path / "runs.db"), log_dir=tmp_path)
    start = ev.add_event("start")
    ev.add_assoc(start, ev.add_step("environment", func=distprog.environment))
    ev.trigger_event(start)

    result = await within(ev.run(), what="the standalone run")

    assert result.ok, [(s.step, s.error) for s in result]
    env = result.step("environment").result
    assert env["USERS_OWN"] == "kept"
    assert "AEVENTOR_CLUSTER_KEY" not in env and "AEVENTOR_KEY" not in env
    assert CLUSTER_KEY not in "\n".join(env.values())


# -- events triggered into a distributed run --------------------------------------------------


async def test_events_triggered_into_a_distributed_run_make_signed_step_runs(
    store: str, agents: Agents, tmp_path: Path
) -> None:
    agent = await agents.start(store, "s1")
    ev = evr.Eventor(name="triggered", store=store, mode="distributed", cluster_key=CLUSTER_KEY)
    start, extra = ev.add_event("start"), ev.add_event("extra")
    # Host s2 has no agent: its step run keeps the run alive, ready.
    ev.add_assoc(start, ev.add_step("hold", host="s2"))
    ev.add_assoc(
        extra,
        ev.add_step(
            "count",
            host="s1",
            func=distprog.tally,
            kwargs={"directory": str(tmp_path)},
            sequence_arg_name="sequence",
        ),
    )
    ev.trigger_event(start)
    async with ev:
        run_id = await ev.submit()
    # From a handle of another "process" (its key from the environment, as the CLI's).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AEVENTOR_CLUSTER_KEY", CLUSTER_KEY)
        handle = evr.attach(store, run_id)
        await handle.trigger_event("extra", "x")

        async def counted() -> bool:
            rows = await rows_of(store, step_run.c.run_id == run_id, step_run.c.step == "count")
            return bool(rows) and rows[0].status == "success"

        await wait_until(counted, what="the triggered step to run")
        handle.cancel()
        await within(handle.wait(), what="the cancelled run")
    assert len(tally(tmp_path, "x")) == 1
    assert agent.records("step.refused") == [], agent.log()
