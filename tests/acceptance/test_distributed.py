"""Distributed mode end to end: real agent processes, real submitters, real sshd.

Agents are ``python -m aeventor.agent`` subprocesses (see :mod:`.agents`); programs are
submitted from this process (``await ev.run()``), from the ``aeventor`` CLI, or from a
subprocess that is killed right after submitting. The steps report where they ran
(``EVENTOR_HOST``, ``SSH_CONNECTION``) and the store says which agent ran them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores import schema as _schema
from aeventor.program.model import ProgramDef
from tests.sshd import SshServers, ssh_hosts, ssh_servers

from . import distprog
from .agents import (
    ALLOW,
    CLUSTER_KEY,
    HERE,
    OTHER_KEY,
    ROOT,
    AgentProcess,
    Agents,
    agent_rows,
    execute,
    pid_alive,
    program_rows,
    read_text,
    run_rows,
    session_members,
    subprocess_env,
    wait_until,
    within,
)

__all__ = ("ssh_hosts", "ssh_servers")  # fixtures, imported to be found

pytestmark = pytest.mark.timeout(90)

#: The example's step -> host assignment.
HOSTS = {"s11": "s1", "s12": "s2", "s2": "s2", "s3": "s1"}
#: What a refused step's error starts with.
REFUSED = re.compile(r"^refused by worker \S+: ")


def ssh_server_address(ssh_connection: str | None) -> str | None:
    """The server address of ``$SSH_CONNECTION`` (client ip, client port, server ip, port)."""
    return None if ssh_connection is None else ssh_connection.split()[2]


async def run_example(store: str) -> evr.RunResult:
    ev = distprog.example(store=store, cluster_key=CLUSTER_KEY)
    return await within(ev.run(), what="the example's distributed run")


def check_example(result: evr.RunResult, by_host: Mapping[str, AgentProcess]) -> None:
    """The example ran to success: each step once, in order, on its host's agent."""
    assert result.ok, (result.status, result.reason, [(s.step, s.error) for s in result])
    steps = {s.step: s for s in result.steps}
    # s2 once, although both s11 and s12 fired run_step2.
    assert sorted(s.step for s in result.steps) == ["s11", "s12", "s2", "s3"], result.steps
    for name, step in steps.items():
        assert step.status is evr.StepStatus.success, (name, step.error)
        assert step.sequence == "1"
        assert step.host == HOSTS[name]
        assert step.result["prog"] == "prog" + name[1:]
        # The step saw its assignment and sequence, and its host's agent ran it.
        assert step.result["host"] == HOSTS[name], step.result
        assert step.result["sequence"] == "1", step.result
        assert by_host[HOSTS[name]].ran(step.worker), (name, step.worker)
    first = min(steps["s11"].ended, steps["s12"].ended)
    assert steps["s2"].started >= first
    assert steps["s3"].started >= steps["s2"].ended


# -- 1 and 4: the design notes' example on two local agents ---------------------------------


@pytest.mark.postgres
async def test_example_on_two_agents_postgres(pg_store: str, agents: Agents) -> None:
    s1 = await agents.start(pg_store, "s1")
    s2 = await agents.start(pg_store, "s2")

    result = await run_example(pg_store)

    check_example(result, {"s1": s1, "s2": s2})
    # Each agent logged the steps it ran, and only those.
    for agent, host in ((s1, "s1"), (s2, "s2")):
        ended = {r["step"] for r in agent.records("step.ended")}
        assert ended == {name for name, h in HOSTS.items() if h == host}, agent.log()


@pytest.mark.mysql
async def test_example_on_two_agents_mariadb(mysql_store: str, agents: Agents) -> None:
    s1 = await agents.start(mysql_store, "s1")
    s2 = await agents.start(mysql_store, "s2")

    result = await run_example(mysql_store)

    check_example(result, {"s1": s1, "s2": s2})


# -- 2: one agent serving both hosts over SSH ------------------------------------------------


@pytest.mark.postgres
async def test_example_over_ssh(pg_store: str, agents: Agents, ssh_servers: SshServers) -> None:
    servers = ssh_servers.servers
    user = "root@" if os.geteuid() == 0 else ""
    agent = await agents.start(
        pg_store,
        ssh_hosts={
            "s1": f"{user}{servers['s1'].host}:{servers['s1'].port}",
            "s2": f"{user}{servers['s2'].host}:{servers['s2'].port}",
        },
        args=[
            "--known-hosts",
            str(ssh_servers.known_hosts),
            "--client-key",
            str(ssh_servers.client_key),
            "--ssh-python",
            sys.executable,
        ],
    )
    logins = {name: servers[name].accepted_logins() for name in ("s1", "s2")}

    result = await run_example(pg_store)

    check_example(result, {"s1": agent, "s2": agent})
    for step in result.steps:
        assert ssh_server_address(step.result["ssh_connection"]) == servers[HOSTS[step.step]].host
    # The steps went through both servers.
    for name in ("s1", "s2"):
        assert servers[name].accepted_logins() > logins[name], servers[name].log()


# -- 3: the submitter dies; the agents carry the run -----------------------------------------

SUBMIT_AND_DIE = """
import asyncio, os, signal, sys
from tests.acceptance import distprog

async def main():
    ev = distprog.example(store=sys.argv[1])
    run_id = await ev.submit()
    print(run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def run_submitter(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
        cwd=ROOT,
    )
    try:
        out, err = await within(proc.communicate(), what=f"submitter {' '.join(argv)}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.postgres
@pytest.mark.parametrize("submitter", ["killed", "cli"])
async def test_run_outlives_its_submitter(pg_store: str, agents: Agents, submitter: str) -> None:
    if submitter == "killed":
        code, out, err = await run_submitter(sys.executable, "-c", SUBMIT_AND_DIE, pg_store)
        assert code == -signal.SIGKILL, (code, out, err)
    else:
        code, out, err = await run_submitter(
            sys.executable, "-m", "aeventor", "submit", f"{HERE / 'distprog.py'}:build",
            "--store", pg_store,
        )  # fmt: skip
        assert code == 0, (code, out, err)
    run_id = out.split()[0]
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), out
    # Submitted while no agent runs: nothing moves until the agents start.
    (run,) = await run_rows(pg_store)
    assert (run.id, run.status, run.mode) == (run_id, "running", "distributed")

    s1 = await agents.start(pg_store, "s1")
    s2 = await agents.start(pg_store, "s2")
    result = await within(evr.attach(pg_store, run_id).wait(), what=f"run {run_id}")

    check_example(result, {"s1": s1, "s2": s2})


# -- 5: refusals ---------------------------------------------------------------------------


@pytest.mark.postgres
async def test_step_not_allowed_is_refused(pg_store: str, agents: Agents, tmp_path: Path) -> None:
    agent = await agents.start(pg_store, "s1", allow=["some_other_package.*"])
    marker = tmp_path / "marker"
    ev = evr.Eventor(name="refused", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    step = ev.add_step(
        "write", host="s1", func=distprog.write_marker, kwargs={"path": str(marker), "text": "x"}
    )
    ev.add_assoc(start, step)
    ev.trigger_event(start)

    result = await within(ev.run(), what="the refused run")

    assert result.status is evr.RunStatus.failure, result
    write = result.step("write")
    assert write.status is evr.StepStatus.failure
    assert REFUSED.match(write.error), write.error
    assert "not allowed" in write.error and "--allow" in write.error, write.error
    assert "tests.acceptance.distprog" in write.error, write.error
    assert "not allowed" in (result.reason or ""), result.reason
    assert not marker.exists()
    (refused,) = agent.records("step.refused")
    assert (refused["run_id"], refused["step"]) == (result.run_id, "write"), refused
    assert "not allowed" in refused["reason"] and "--allow" in refused["reason"], refused


def tampered_program(definition: str, *, recompute_version: bool) -> dict[str, str]:
    """A stored definition with a step's kwarg changed (and its version made to match)."""
    data = json.loads(definition)
    assert '"safe"' in definition, definition
    text = definition.replace('"safe"', '"evil"')
    values = {"definition": text}
    if recompute_version:
        # The attacker also fixes the version: only the signature can tell.
        program = ProgramDef.from_json(json.loads(text))
        assert program.canonical_json() == text
        values["version"] = program.version
        assert values["version"] != ProgramDef.from_json(data).version
    return values


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("recompute_version", "reason"),
    [
        (False, "stored definition does not match its version"),
        (True, "signature does not verify with this agent's cluster key"),
    ],
    ids=["definition", "definition-and-version"],
)
async def test_tampered_program_is_refused(
    pg_store: str, agents: Agents, tmp_path: Path, recompute_version: bool, reason: str
) -> None:
    marker = tmp_path / "marker"
    ev = evr.Eventor(name="tampered", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    step = ev.add_step(
        "write",
        host="s1",
        func=distprog.write_marker,
        kwargs={"path": str(marker), "text": "safe"},
    )
    ev.add_assoc(start, step)
    ev.trigger_event(start)
    async with ev:
        run_id = await ev.submit()
    # No agent runs yet: the database is changed behind the submitter's back.
    (program,) = await program_rows(pg_store)
    await execute(
        pg_store,
        _schema.program.update()
        .where(_schema.program.c.id == program.id)
        .values(**tampered_program(program.definition, recompute_version=recompute_version)),
    )

    agent = await agents.start(pg_store, "s1")
    result = await within(evr.attach(pg_store, run_id).wait(), what=f"run {run_id}")

    assert result.status is evr.RunStatus.failure, result
    write = result.step("write")
    assert write.status is evr.StepStatus.failure
    assert REFUSED.match(write.error) and reason in write.error, write.error
    assert write.pid is None and write.result is None
    assert not marker.exists(), marker.read_text()
    (refused,) = agent.records("step.refused")
    assert refused["run_id"] == run_id and reason in refused["reason"], refused


@pytest.mark.postgres
async def test_run_signed_with_another_key_is_refused(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    agent = await agents.start(pg_store, "s1")

    def program(key: str, sequence: str) -> evr.Eventor:
        ev = evr.Eventor(name="keyed", store=pg_store, mode="distributed", cluster_key=key)
        start = ev.add_event("start")
        step = ev.add_step(
            "mark",
            host="s1",
            func=distprog.mark,
            kwargs={"directory": str(tmp_path)},
            sequence_arg_name="sequence",
        )
        ev.add_assoc(start, step)
        ev.trigger_event(start, sequence)
        return ev

    # The same program version: registered and signed with the cluster key, it runs.
    good = await within(program(CLUSTER_KEY, "good").run(), what="the run signed right")
    assert good.ok, [(s.step, s.error) for s in good]
    assert (tmp_path / "good").is_file()
    # A run of it signed with another key (its program row keeps the valid signature).
    bad = await within(program(OTHER_KEY, "bad").run(), what="the run signed wrong")
    assert bad.status is evr.RunStatus.failure, bad
    error = bad.step("mark", "bad").error
    assert REFUSED.match(error), error
    assert f"run {bad.run_id}: its signature does not verify" in error, error
    assert not (tmp_path / "bad").exists()
    # A program signed with another key altogether.
    other = evr.Eventor(name="foreign", store=pg_store, mode="distributed", cluster_key=OTHER_KEY)
    start = other.add_event("start")
    other.add_assoc(
        start,
        other.add_step(
            "mark",
            host="s1",
            func=distprog.mark,
            kwargs={"directory": str(tmp_path)},
            sequence_arg_name="sequence",
        ),
    )
    other.trigger_event(start, "foreign")
    foreign = await within(other.run(), what="the foreign program's run")
    assert foreign.status is evr.RunStatus.failure, foreign
    error = foreign.step("mark", "foreign").error
    assert "program 'foreign'" in error and "signature does not verify" in error, error
    assert not (tmp_path / "foreign").exists()
    assert len(agent.records("step.refused")) == 2, agent.log()


# -- 6: host rules --------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("entry", ["run", "submit", "start"])
async def test_ambiguous_host_fails_before_anything_is_written(pg_store: str, entry: str) -> None:
    ev = evr.Eventor(name="ambiguous", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start, joined = ev.add_event("start"), ev.add_event("joined")
    a = ev.add_step("a", host="s1", func=distprog.where, kwargs={"progname": "a"},
                    triggers={evr.StepStatus.success: joined})  # fmt: skip
    b = ev.add_step("b", host="s2", func=distprog.where, kwargs={"progname": "b"},
                    triggers={evr.StepStatus.success: joined})  # fmt: skip
    c = ev.add_step("c", func=distprog.where, kwargs={"progname": "c"})
    ev.add_assoc(start, a, b)
    ev.add_assoc(joined, c)
    ev.trigger_event(start)

    with pytest.raises(evr.ProgramDefinitionError) as info:
        if entry == "run":
            await ev.run()
        elif entry == "submit":
            await ev.submit()
        else:
            ev.start()
    await ev.close()

    message = str(info.value)
    assert "'c'" in message and "a on s1" in message and "b on s2" in message, message
    assert "default_host" in message, message
    assert await run_rows(pg_store) == []
    assert await program_rows(pg_store) == []


@pytest.mark.postgres
async def test_hosts_follow_predecessors_and_groups(pg_store: str, agents: Agents) -> None:
    s1 = await agents.start(pg_store, "s1")
    s2 = await agents.start(pg_store, "s2")
    ev = evr.Eventor(name="hosts", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start, after = ev.add_event("start"), ev.add_event("after")
    group = ev.add_group("g", host="s1", env={"GROUP_VAR": "from-group", "OWN_VAR": "group"})
    first = ev.add_step("first", host="s2", func=distprog.where, kwargs={"progname": "first"},
                        triggers={evr.StepStatus.success: after})  # fmt: skip
    follower = ev.add_step("follower", func=distprog.where, kwargs={"progname": "follower"})
    grouped = ev.add_step("grouped", group=group, func=distprog.where,
                          kwargs={"progname": "grouped"}, env={"OWN_VAR": "step"})  # fmt: skip
    ev.add_assoc(start, first, grouped)
    ev.add_assoc(after, follower)
    ev.trigger_event(start)

    result = await within(ev.run(), what="the host rules' run")

    assert result.ok, [(s.step, s.error) for s in result]
    expected = {"first": ("s2", s2), "follower": ("s2", s2), "grouped": ("s1", s1)}
    for name, (host, agent) in expected.items():
        step = result.step(name)
        assert step.host == host and step.result["host"] == host, (name, step)
        assert agent.ran(step.worker), (name, step.worker)
    env = result.step("grouped").result["env"]
    assert env["GROUP_VAR"] == "from-group" and env["OWN_VAR"] == "step", env
    # The group's env applies to its members only.
    assert result.step("first").result["env"]["GROUP_VAR"] is None


# -- 7: SIGTERM drains an agent ---------------------------------------------------------------


@pytest.mark.postgres
async def test_sigterm_drains_after_grace(pg_store: str, agents: Agents, tmp_path: Path) -> None:
    agent = await agents.start(pg_store, "s1", args=["--grace", "1"])
    report = tmp_path / "sleeper.json"
    ev = evr.Eventor(name="drain", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    ev.add_assoc(
        start, ev.add_step("sleep", host="s1", func=distprog.sleep_long,
                           kwargs={"report": str(report)})
    )  # fmt: skip
    ev.trigger_event(start)
    handle = ev.start()
    await wait_until(report.exists, what="the step to start sleeping")
    pids = json.loads(report.read_text())

    code = await agent.stop()  # SIGTERM, then wait for the exit

    assert code == 0, agent.log()
    result = await within(handle.wait(), what="the drained run")
    assert result.status is evr.RunStatus.failure, result
    sleep = result.step("sleep")
    assert sleep.status is evr.StepStatus.failure
    assert "shut down" in sleep.error and "1s grace period" in sleep.error, sleep.error
    assert sleep.pid == pids["pid"]
    assert not [s for s in result if s.status in (evr.StepStatus.ready, evr.StepStatus.active)]
    (row,) = await agent_rows(pg_store)
    assert row.pid == agent.pid and row.stopped is not None
    # The step, its child and anything in its session are gone.
    await wait_until(
        lambda: not pid_alive(pids["pid"]) and not pid_alive(pids["child"]),
        what="the step's processes to be gone",
        deadline=5,
    )
    assert session_members(pids["pid"]) == []
    events = [r["event"] for r in agent.records()]
    assert events.index("worker.draining") < events.index("step.terminated"), events
    assert events[-1] == "agent.stopped", events


# -- 8: `aeventor agent start --ssh` -----------------------------------------------------------


@pytest.mark.postgres
async def test_agent_started_over_ssh(
    pg_store: str, agents: Agents, ssh_servers: SshServers, tmp_path: Path
) -> None:
    server = ssh_servers.servers["s2"]
    user = "root@" if os.geteuid() == 0 else ""
    remote_log = tmp_path / "remote-agent.log"
    s1 = await agents.start(pg_store, "s1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aeventor", "agent", "start",
        "--host", "s2", "--ssh", f"{user}{server.host}:{server.port}",
        "--known-hosts", str(ssh_servers.known_hosts),
        "--client-key", str(ssh_servers.client_key),
        "--python", sys.executable,
        "--forward-env", "AEVENTOR_CLUSTER_KEY",
        "--forward-env", "PYTHONPATH",
        "--log", str(remote_log),
        "--",
        "--store", pg_store, "--json-logs",
        "--heartbeat", "0.5", "--lease", "5",
        "--log-dir", str(tmp_path / "remote-steps"),
        # Its steps inherit SSH_CONNECTION (the agent's sshd session) only when told so.
        "--pass-env", "SSH_*",
        *[arg for pattern in ALLOW for arg in ("--allow", pattern)],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
        cwd=ROOT,
    )  # fmt: skip
    out, err = await within(proc.communicate(), what="aeventor agent start")
    assert proc.returncode == 0, (out, err)
    match = re.search(rb"pid (\d+)", out)
    assert match, out
    pid = int(match.group(1))
    try:
        # Ready once its row is in the store.
        async def registered() -> bool:
            if not pid_alive(pid):
                raise AssertionError(f"remote agent {pid} exited:\n{read_text(remote_log)}")
            return any(r.pid == pid and r.stopped is None for r in await agent_rows(pg_store))

        await wait_until(registered, what=f"the remote agent {pid} to register")

        result = await run_example(pg_store)

        assert result.ok, [(s.step, s.error) for s in result]
        for step in result.steps:
            host = HOSTS[step.step]
            assert step.result["host"] == host
            if host == "s2":
                # Run by the agent started over SSH, in its sshd session.
                assert step.worker.split(":")[1] == str(pid), step.worker
                assert ssh_server_address(step.result["ssh_connection"]) == server.host
            else:
                assert s1.ran(step.worker), step.worker
                assert step.result["ssh_connection"] is None
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
        try:
            await wait_until(lambda: not pid_alive(pid), what=f"remote agent {pid} to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            raise
    rows = [r for r in await agent_rows(pg_store) if r.pid == pid]
    assert rows and rows[0].stopped is not None, read_text(remote_log)


# -- 9: a dead agent's step run is reaped when its lease lapses -----------------------------


@pytest.mark.postgres
async def test_lapsed_lease_of_a_killed_agent_is_reaped(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    doomed = await agents.start(pg_store, "s1", args=["--lease", "2"])
    report = tmp_path / "sleeper.json"
    ev = evr.Eventor(name="reap", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start, lost = ev.add_event("start"), ev.add_event("lost")
    ev.add_step(
        "sleep", host="s1", func=distprog.sleep_long, kwargs={"report": str(report)},
        triggers={evr.StepStatus.failure: (lost,)},
    )  # fmt: skip
    ev.add_step("after_loss", host="s2", func=distprog.where, kwargs={"progname": "after"})
    ev.add_assoc(start, "sleep")
    ev.add_assoc(lost, "after_loss")
    ev.trigger_event(start)
    handle = ev.start()
    await wait_until(report.exists, what="the step to start sleeping")
    pids = json.loads(report.read_text())
    try:
        doomed.proc.kill()  # SIGKILL: no drain, no final write; only the lease tells
        await doomed.proc.wait()
        # Another agent (another host) reaps the step once its lease has lapsed; the step's
        # failure trigger then runs "after_loss" there.
        await agents.start(pg_store, "s2", args=["--lease", "2"])
        result = await within(handle.wait(), what="the run to end after the reaping")
    finally:
        for pid in (pids["child"], pids["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    sleep = result.step("sleep")
    assert sleep.status is evr.StepStatus.lost
    assert sleep.error is not None and "lease" in sleep.error, sleep.error
    assert result.step("after_loss").status is evr.StepStatus.success
    assert result, result.reason


# -- 10: a run cancelled from anywhere; its agent terminates the running step ----------------


@pytest.mark.postgres
async def test_cancelled_run_terminates_the_step_on_its_agent(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    agent = await agents.start(pg_store, "s1")
    report = tmp_path / "sleeper.json"
    ev = evr.Eventor(name="cancel", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    ev.add_assoc(
        start, ev.add_step("sleep", host="s1", func=distprog.sleep_long,
                           kwargs={"report": str(report)})
    )  # fmt: skip
    ev.trigger_event(start)
    handle = ev.start()
    await wait_until(report.exists, what="the step to start sleeping")
    pids = json.loads(report.read_text())
    try:
        # From another handle, as from another process: only the store tells the agent.
        attached = evr.attach(pg_store, handle.run_id)
        attached.cancel()
        cancelled = await within(attached.wait(), what="the cancelled run")
        # The agent terminates the step at its next heartbeat (every 0.5 s here).
        await wait_until(
            lambda: not pid_alive(pids["pid"]) and not pid_alive(pids["child"]),
            what="the cancelled step's processes to be gone",
            deadline=10,
        )
    finally:
        for pid in (pids["child"], pids["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert session_members(pids["pid"]) == []
    assert cancelled.status is evr.RunStatus.cancelled, cancelled
    result = await within(handle.wait(), what="the submitter's handle")
    assert result.status is evr.RunStatus.cancelled, result
    sleep = result.step("sleep")
    # Recorded cancelled, not overwritten by the agent as it terminated the step.
    assert sleep.status is evr.StepStatus.cancelled, (sleep.status, sleep.error)
    assert agent.ran(sleep.worker) and sleep.pid == pids["pid"], sleep

    async def logged() -> bool:
        records = await asyncio.to_thread(agent.records)
        return any(r["event"] == "step.cancelled" for r in records)

    await wait_until(logged, what="the agent to log step.cancelled")
    assert not agent.records("step.terminated"), agent.log()
    assert not agent.records("step.ended"), agent.log()
    # The agent lives on, and serves its host.
    assert agent.proc.returncode is None, agent.log()
    assert (await run_example_on_s1(pg_store)).ok


async def run_example_on_s1(store: str) -> evr.RunResult:
    ev = evr.Eventor(name="after_cancel", store=store, mode="distributed", cluster_key=CLUSTER_KEY)
    start = ev.add_event("start")
    ev.add_assoc(
        start, ev.add_step("where", host="s1", func=distprog.where, kwargs={"progname": "p"})
    )
    ev.trigger_event(start)
    return await within(ev.run(), what="a run after the cancelled one")
