"""Steps on SSH hosts under the run's control: events fired from a function step on an SSH host
(``aeventor.current_step().trigger``, over the step's channel forwarded back through SSH),
and one such step cancelled (``aeventor cancel RUN STEP``), on sqlite and Postgres.

SSH steps run on the agents that serve their hosts over SSH: an :class:`~aeventor.agent.Agent`
runs in this process, serving host ``s1`` of :mod:`tests.sshd` (a real sshd on 127.0.0.2),
on the test's store; the runs are submitted to it as a distributed run is. The sshd runs on
this machine, so what the remote step left behind (processes, files) shows here.

Last, a server that refuses to forward (``AllowStreamLocalForwarding no``): the step runs
without a channel, and ``current_step()`` tells it so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import asyncssh
import pytest

import aeventor as evr
from aeventor.agent import Agent, AgentConfig
from aeventor.backends.executors.ssh import SshExecutor, SshTarget
from aeventor.backends.stores import open_store
from aeventor.backends.stores.base import Database
from aeventor.dispatch.executor import StepLaunch
from aeventor.dispatch.store import Claim
from aeventor.program.model import StepDef
from aeventor.signing import CLUSTER_KEY_ENV
from aeventor.submission import follow, submit
from tests.backends import backend_url
from tests.sshd import SshServers, ssh_hosts, ssh_servers

from ..waiting import pid_alive, wait_event, wait_until, within
from . import sshfuncs

__all__ = ("ssh_hosts", "ssh_servers")  # fixtures, imported to be found

pytestmark = pytest.mark.timeout(120)

S = evr.StepStatus
KEY = b"ssh-step-control-cluster-key-0123456789abcdef"
AEVENTOR = str(Path(sys.executable).with_name("aeventor"))
#: Seconds of the agent's leases; it heartbeats (and learns of cancels) every 0.5 s.
LEASE = 3.0
HEARTBEAT = 0.5


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = open_store(url, program="ssh-step-control")
    async with database:
        yield database


@pytest.fixture
async def agent(
    url: str, ssh_hosts: Mapping[str, SshTarget], tmp_path: Path
) -> AsyncIterator[Agent]:
    """An agent serving host ``s1`` over SSH on the test's store, until the test ends.

    Its store object is its own, as an agent's process's is (a Postgres store ignores the
    notifications it sent itself), and it polls: sqlite has no notifications between store
    objects, and an agent whose first look came before the submission would never wake.
    """
    async with (
        open_store(url, program="aeventor-agent", poll_interval=0.1) as agent_db,
        serving(agent_db, ssh_hosts, tmp_path) as served,
    ):
        yield served


@contextlib.asynccontextmanager
async def serving(
    db: Database, ssh_hosts: Mapping[str, SshTarget], tmp_path: Path
) -> AsyncIterator[Agent]:
    served = Agent(
        db=db,
        config=AgentConfig(
            hosts=(),
            ssh_targets={"s1": ssh_hosts["s1"]},
            cluster_key=KEY,
            allow=("tests.*",),
            lease=LEASE,
            heartbeat=HEARTBEAT,
            grace=5.0,
            log_dir=tmp_path / "logs",
        ),
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    # Awaited at teardown (which pytest-asyncio may run in another task than the setup: no
    # TaskGroup across the yield); a crash of the agent is raised there.
    task = asyncio.create_task(served.run(stop, ready=ready))
    try:
        await wait_event(ready, what="the agent to be ready")
        yield served
    finally:
        stop.set()
        await within(task, what="the agent to stop")


def program(name: str) -> evr.Eventor:
    return evr.Eventor(name=name, mode="distributed", cluster_key=KEY)


def step_files() -> set[Path]:
    """The SSH steps' temporary files on the hosts (this machine): pid, result and socket."""
    return set(Path("/tmp").glob("aeventor-" + "[0-9a-f]" * 32 + ".*"))


async def pgrep(*args: str) -> set[int]:
    """The pids ``pgrep ARGS`` finds (``-f MARKER``: in argv; ``-g PGID``: in a group)."""
    proc = await asyncio.create_subprocess_exec("pgrep", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return {int(pid) for pid in out.split()}


def ssh_server_address(ssh_connection: str) -> tuple[str, str]:
    """The server's address and port in ``$SSH_CONNECTION`` (client ip, port, server ip, port)."""
    _, _, address, port = ssh_connection.split()
    return address, port


# -- events --------------------------------------------------------------------------------


async def test_a_step_on_an_ssh_host_fires_events_that_start_other_steps(
    db: Database, agent: Agent, ssh_servers: SshServers
) -> None:
    ev = program("ssh_events")
    ev.add_event("go")
    ev.add_event("next")
    ev.add_step("firer", sshfuncs.fire, args=["next", "7"], host="s1")
    ev.add_step("after", sshfuncs.where, args=["after"], host="s1")
    ev.add_assoc("go", "firer")
    ev.add_assoc("next", "after")
    files_before = await asyncio.to_thread(step_files)

    run_id = await submit(db, ev.program, [("go", "0")], key=KEY)
    result = await within(follow(db, run_id), what="the run")

    assert result.ok, [(s.step, s.sequence, s.error) for s in result.steps]
    server = ssh_servers.servers["s1"]
    firer = result.step("firer")
    # It ran through sshd on s1, and fired through the channel it was given there.
    assert ssh_server_address(firer.result["ssh_connection"]) == (server.host, str(server.port))
    assert (firer.result["step"], firer.result["run_id"]) == ("firer", run_id)
    channel = firer.result["channel"]
    assert channel.startswith("/tmp/aeventor-") and channel.endswith(".sock"), channel
    # The event started `after` for the step's own sequence and for the one it named, and
    # each ran on s1.
    after = sorted((s for s in result.steps if s.step == "after"), key=lambda s: s.sequence)
    assert [(s.sequence, s.status) for s in after] == [("0", S.success), ("7", S.success)]
    for step in after:
        assert ssh_server_address(step.result["ssh_connection"]) == (server.host, str(server.port))
    # The step's socket went with its other files.
    assert not await asyncio.to_thread(os.path.exists, channel)
    assert await asyncio.to_thread(step_files) == files_before


async def test_an_undefined_event_raises_in_the_ssh_step_which_fails(
    db: Database, agent: Agent
) -> None:
    ev = program("ssh_undefined")
    ev.add_event("go")
    ev.add_step("firer", sshfuncs.fire, args=["no_such_event"], host="s1")
    ev.add_assoc("go", "firer")

    run_id = await submit(db, ev.program, [("go", "0")], key=KEY)
    result = await within(follow(db, run_id), what="the run")

    assert result.status is evr.RunStatus.failure
    firer = result.step("firer")
    assert firer.status is S.failure
    # The step raised the worker's answer (its traceback is the step's error).
    error = firer.error or ""
    assert "AeventorError: trigger('no_such_event'): step 'firer' fired undefined event" in error
    assert "define it with ev.add_event('no_such_event')" in error
    assert [s.step for s in result.steps] == ["firer"]


# -- cancelling one step run ---------------------------------------------------------------


class Sleeper:
    """A long step on ``s1`` (``sshfuncs.spawn_and_sleep``): it starts a python child (which
    starts one of its own) and a ``sh -c "sleep ..."``, all with ``marker`` in their argv,
    and writes the pids to ``report``."""

    def __init__(self, tmp_path: Path) -> None:
        self.marker = f"aeventor-ssh-cancel-{uuid.uuid4().hex}"
        self.report = tmp_path / "report.json"
        self.leader = 0
        self.children: list[int] = []

    def add_to(self, ev: evr.Eventor) -> None:
        ev.add_event("go")
        ev.add_step(
            "sleeper", sshfuncs.spawn_and_sleep, args=[self.marker, str(self.report)], host="s1"
        )
        ev.add_assoc("go", "sleeper")
        ev.trigger_event("go")

    async def running(self) -> None:
        """Return once the step and every one of its processes run on the host."""
        await wait_until(lambda: asyncio.to_thread(self.report.exists), what="the step to start")
        tree = json.loads(await asyncio.to_thread(self.report.read_text))
        self.leader, self.children = tree["pid"], tree["children"]

        async def all_marked() -> bool:
            # Its python child, that child's own child, and the `sh -c "sleep ..."` one.
            return len(await pgrep("-f", self.marker)) == 3

        await wait_until(all_marked, what="the step's marked processes")
        assert await pgrep("-g", str(self.leader)) >= {self.leader, *self.children}

    async def gone(self, files_before: set[Path]) -> None:
        """Return once nothing of the step is left on the host: no process, no file."""

        async def nothing_marked() -> bool:
            return not await pgrep("-f", self.marker)

        await wait_until(nothing_marked, what="the step's marked processes to exit")
        for pid in (self.leader, *self.children):
            await wait_until(
                lambda pid=pid: asyncio.to_thread(lambda: not pid_alive(pid)),  # type: ignore[misc]
                what=f"process {pid} of the step to be gone",
            )

        async def group_empty() -> bool:
            # The `sleep` under the marked `sh` too: it carries no marker.
            return not await pgrep("-g", str(self.leader))

        await wait_until(group_empty, what="the step's process group to be empty")
        # Its pid file and its channel's socket are removed.
        await wait_until(
            lambda: asyncio.to_thread(lambda: step_files() == files_before),
            what="the step's files on the host to be removed",
        )


async def test_aeventor_cancel_of_a_step_on_an_ssh_host_leaves_no_process(
    db: Database, agent: Agent, url: str, tmp_path: Path
) -> None:
    sleeper = Sleeper(tmp_path)
    ev = program("ssh_cancel")
    sleeper.add_to(ev)
    files_before = await asyncio.to_thread(step_files)

    run_id = await submit(db, ev.program, [("go", "0")], key=KEY)
    await sleeper.running()
    done = await asyncio.create_subprocess_exec(
        AEVENTOR, "cancel", run_id[:8], "sleeper", "--store", url, "--reason", "enough",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, CLUSTER_KEY_ENV: KEY.decode()},
    )  # fmt: skip
    out, err = await within(done.communicate(), what="aeventor cancel")
    assert done.returncode == 0, err.decode()
    assert "step sleeper of run" in out.decode() and "cancelled" in out.decode()

    # The agent terminates it at its next heartbeat; nothing else was pending: the run stops.
    result = await within(follow(db, run_id), what="the run")
    step = result.step("sleeper")
    assert (step.status, step.error) == (S.cancelled, "enough")
    assert result.status is evr.RunStatus.failure
    assert "step sleeper[0] was cancelled" in (result.reason or "")
    await sleeper.gone(files_before)


# A distributed run's handle needs a store every host shares: Postgres, not sqlite.
@pytest.mark.parametrize(
    "url", [pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_cancel_step_from_the_handle_of_a_distributed_run_on_an_ssh_host(
    agent: Agent, url: str, tmp_path: Path
) -> None:
    sleeper = Sleeper(tmp_path)
    ev = evr.Eventor(name="ssh_cancel_handle", store=url, mode="distributed", cluster_key=KEY)
    sleeper.add_to(ev)
    files_before = await asyncio.to_thread(step_files)

    async with ev:
        handle = ev.start()
        await sleeper.running()
        await handle.cancel_step("sleeper", 0, reason="enough")
        result = await within(handle.wait(), what="the run")

    step = result.step("sleeper")
    assert (step.status, step.error) == (S.cancelled, "enough")
    assert result.status is evr.RunStatus.failure
    await sleeper.gone(files_before)


# -- a server that does not forward ----------------------------------------------------------


async def test_a_server_refusing_the_forwarding_runs_the_step_without_a_channel(
    ssh_hosts: Mapping[str, SshTarget],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As with ``AllowStreamLocalForwarding no`` in the server's sshd_config."""
    executor = SshExecutor(targets={"s1": ssh_hosts["s1"]})
    fired: list[tuple[str, str]] = []

    async def fire(event: str, sequence: str) -> None:
        fired.append((event, sequence))

    async def started(pid: int) -> None:
        pass

    async def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise asyncssh.ChannelListenError("Failed to create remote UNIX listener")

    step = StepDef(
        name="lonely", executor="process", target=f"{sshfuncs.__name__}:no_channel", host="s1"
    )
    launch = StepLaunch(
        claim=Claim(id=1, run_id="run-1", step="lonely", sequence="0", recovery=0, attempt=1),
        step=step,
        program="prog",
        env={},
        log_path=tmp_path / "lonely.log",
        deterministic_logs=True,
        on_started=started,
        on_trigger=fire,
    )
    try:
        await executor.check("s1")
        conn = executor._hosts["s1"].conn
        assert conn is not None
        monkeypatch.setattr(conn, "start_unix_server", refuse)
        result = await executor.run(launch)
    finally:
        await executor.aclose()

    assert result.ok, result.error
    assert "current_step() is only available inside a step" in result.value
    assert "allows stream-local forwarding" in result.value
    assert fired == []
    [warning] = [r.getMessage() for r in caplog.records if r.name == "aeventor.ssh"]
    assert warning.startswith("step.channel_unavailable")
    assert "AllowStreamLocalForwarding" in warning
