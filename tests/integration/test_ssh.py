"""The SSH executor against real OpenSSH servers on 127.0.0.2-4 (see :mod:`tests.sshd`).

The servers run on this machine, so what a remote step did (its processes, its files) can
be checked directly; that it went through sshd shows in ``SSH_CONNECTION`` and in sshd's
log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from aeventor.backends.executors.local import StepLaunch, build_spec
from aeventor.backends.executors.ssh import CONNECT_ATTEMPTS, SshExecutor, SshTarget
from aeventor.context import EnvPolicy, step_env
from aeventor.dispatch.store import Claim
from aeventor.exceptions import HostUnreachable
from aeventor.program.model import StepDef
from tests.sshd import SshServers, ssh_hosts, ssh_servers, write_known_hosts

from . import sshfuncs
from .helpers import session_members, wait_until

__all__ = ("ssh_hosts", "ssh_servers")  # fixtures, imported to be found

MODULE = sshfuncs.__name__


class Launches:
    """Builds launches for one test and records the pids their steps report."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.pids: list[int] = []
        self.started = asyncio.Event()
        self._next = 0

    async def on_started(self, pid: int) -> None:
        self.pids.append(pid)
        self.started.set()

    def __call__(self, step: StepDef, *, env: Mapping[str, str] | None = None) -> StepLaunch:
        self._next += 1
        claim = Claim(
            id=self._next, run_id="run-1", step=step.name, sequence="0", recovery=0, attempt=1
        )
        if env is None:
            env = step_env(
                run_id=claim.run_id,
                program="prog",
                step=step.name,
                sequence=claim.sequence,
                recovery=0,
                attempt=1,
                logger_name="prog.run-1",
            )
        return StepLaunch(
            claim=claim,
            step=step,
            program="prog",
            env=env,
            log_path=self.log_dir / f"{step.name}.{self._next}.log",
            deterministic_logs=True,
            on_started=self.on_started,
        )


def function_step(name: str, func: str, *args: Any, host: str = "s1") -> StepDef:
    return StepDef(name=name, executor="process", target=f"{MODULE}:{func}", args=args, host=host)


def command_step(name: str, argv: Sequence[str], *, host: str = "s1") -> StepDef:
    return StepDef(name=name, executor="command", argv=tuple(argv), host=host)


def step_files() -> set[Path]:
    """The SSH steps' temporary files on the hosts (this machine): pid and result files."""
    return set(Path("/tmp").glob("aeventor-" + "[0-9a-f]" * 32 + ".*"))


async def pgrep(*args: str) -> set[int]:
    """The pids ``pgrep ARGS`` finds (``-f MARKER``: in argv; ``-g PGID``: in a group)."""
    proc = await asyncio.create_subprocess_exec("pgrep", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return {int(pid) for pid in out.split()}


def count(args: tuple[str, ...], expected: int) -> Callable[[], Awaitable[bool]]:
    """A condition: ``pgrep ARGS`` finds ``expected`` processes."""

    async def condition() -> bool:
        return len(await pgrep(*args)) == expected

    return condition


@pytest.fixture
def launches(tmp_path: Path) -> Launches:
    return Launches(tmp_path / "logs")


@pytest.fixture
async def executor(ssh_hosts: Mapping[str, SshTarget]) -> AsyncIterator[SshExecutor]:
    ex = SshExecutor(targets=ssh_hosts)
    try:
        yield ex
    finally:
        await ex.aclose()


# -- steps ---------------------------------------------------------------------------------


async def test_function_step_runs_through_sshd_on_its_host(
    executor: SshExecutor, launches: Launches, ssh_servers: SshServers
) -> None:
    launch = launches(function_step("where", "where", "marker-42"))
    files_before = await asyncio.to_thread(step_files)

    result = await executor.run(launch)

    assert result.ok, result.error
    value = result.value
    assert value["hostname"] == socket.gethostname()
    # SSH_CONNECTION is "client_ip client_port server_ip server_port": sshd on s1 ran it.
    server = ssh_servers.servers["s1"]
    assert value["ssh_connection"].split()[2:] == [server.host, str(server.port)]
    # The pid reported at start is the runner's, and it leads its process group.
    assert launches.pids == [value["pid"]]
    assert value["pgid"] == value["pid"]
    log = launch.log_path.read_text()
    assert "stdout says marker-42" in log
    assert "WARNING sshfuncs: logging says marker-42" in log
    # Its pid and result files on the host are gone.
    assert await asyncio.to_thread(step_files) == files_before


async def test_remote_step_gets_the_launch_environment(
    executor: SshExecutor, launches: Launches
) -> None:
    step = function_step("where", "where", "env")
    env = {
        **launches(step).env,
        # Shell metacharacters and quotes must arrive intact.
        "AEVENTOR_TRICKY": 'it\'s "quoted" $HOME; `true` | & *',
    }
    launch = launches(step, env=env)

    result = await executor.run(launch)

    assert result.ok, result.error
    assert result.value["env"] == env
    assert {k for k in env if k.startswith("EVENTOR_")} >= {
        "EVENTOR_RUN_ID",
        "EVENTOR_STEP_NAME",
        "EVENTOR_STEP_SEQUENCE",
    }


def env_lines(text: str) -> dict[str, str]:
    """``env``'s output (one NAME=value a line) as a dict."""
    found = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.isidentifier():
            found[name] = value
    return found


#: What the login shell of a session adds to sshd's environment, or sets for its command.
SHELL_VARS = {"PWD", "OLDPWD", "SHLVL", "_"}


async def test_remote_steps_get_no_secret_of_the_agent(
    ssh_hosts: Mapping[str, SshTarget], launches: Launches, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent's environment: secrets, a private variable, and what --pass-env names.
    secrets = {
        "AEVENTOR_CLUSTER_KEY": "cluster-key-0123456789abcdef-0123456789",
        "AEVENTOR_CLUSTER_KEY_FILE": "/nonexistent/cluster.key",
        "AEVENTOR_KEY": "fernet-key-of-the-store-passwords",
        "PGPASSWORD": "s3cret-pw-7f1c",
        "AGENT_PRIVATE": "not for steps",
    }
    for name, value in {**secrets, "PROJECT_FLAG": "yes"}.items():
        monkeypatch.setenv(name, value)
    executor = SshExecutor(
        targets=ssh_hosts, env=EnvPolicy.agent(["PROJECT_*", "AEVENTOR_CLUSTER_KEY"])
    )
    try:
        # What sshd gives any session on that host, without aeventor.
        status, out, _ = await executor.shell("s1", "env")
        assert status == 0, out
        login = env_lines(out).keys()
        function = launches(function_step("environment", "environment"))
        command = launches(command_step("printenv", ["env"]))
        result = await executor.run(function)
        printed = await executor.run(command)
    finally:
        await executor.aclose()

    assert result.ok and printed.ok, (result.error, printed.error)
    for launch, env in (
        (function, result.value),
        (command, env_lines(command.log_path.read_text())),
    ):
        sent = set(launch.env) | {"PROJECT_FLAG"}
        if launch is function:
            # Python coerces a C locale to UTF-8 by setting LC_CTYPE (PEP 538).
            sent.add("LC_CTYPE")
        assert env["PROJECT_FLAG"] == "yes"
        assert {k: env[k] for k in launch.env} == dict(launch.env)
        # Only sshd's login environment and what aeventor sent.
        assert env.keys() - login - sent <= SHELL_VARS, env.keys() - login - sent
        text = "\n".join(f"{k}={v}" for k, v in env.items())
        for value in secrets.values():
            assert value not in text, (value, env)
        assert not [k for k in env if k.startswith("AEVENTOR_")], env


async def test_function_step_failure_carries_the_traceback(
    executor: SshExecutor, launches: Launches
) -> None:
    # A function that does not exist in the module fails at import, remotely.
    launch = launches(function_step("missing", "no_such_function"))

    result = await executor.run(launch)

    assert not result.ok
    assert "AttributeError" in (result.error or "")
    assert "no_such_function" in launch.log_path.read_text()


async def test_command_steps_exit_codes(executor: SshExecutor, launches: Launches) -> None:
    ok = launches(command_step("ok", ["sh", "-c", "echo out; echo err >&2"]))
    bad = launches(command_step("bad", ["sh", "-c", "exit 3"]))

    good, failed = await asyncio.gather(executor.run(ok), executor.run(bad))

    assert (good.ok, good.value) == (True, 0)
    assert ok.log_path.read_text() == "out\nerr\n"
    assert (failed.ok, failed.value) == (False, 3)
    assert failed.error == "command 'sh' exited with 3"
    assert len(launches.pids) == 2


async def test_missing_remote_interpreter_fails_the_step_with_its_log(
    ssh_hosts: Mapping[str, SshTarget], launches: Launches
) -> None:
    targets = {"s1": replace(ssh_hosts["s1"], python="/nonexistent/python3")}
    executor = SshExecutor(targets=targets)
    try:
        launch = launches(function_step("where", "where", "x"))
        result = await executor.run(launch)
    finally:
        await executor.aclose()

    assert not result.ok
    assert "exited with 127 before reporting a result" in (result.error or "")
    assert "/nonexistent/python3" in launch.log_path.read_text()


# -- connections ---------------------------------------------------------------------------


async def test_steps_on_one_host_share_one_connection(
    executor: SshExecutor, launches: Launches, ssh_servers: SshServers
) -> None:
    s1, s2 = ssh_servers.servers["s1"], ssh_servers.servers["s2"]
    logins_before = s1.accepted_logins(), s2.accepted_logins()

    for i in range(3):
        result = await executor.run(launches(command_step(f"seq{i}", ["true"])))
        assert result.ok, result.error
    results = await asyncio.gather(
        executor.run(launches(function_step("f1", "where", "a"))),
        executor.run(launches(function_step("f2", "where", "b"))),
        executor.run(launches(command_step("c", ["true"], host="s2"))),
    )

    assert all(r.ok for r in results), results
    assert executor.connections_opened == 2  # one for s1, one for s2
    await wait_until(
        lambda: (
            (s1.accepted_logins(), s2.accepted_logins())
            == (logins_before[0] + 1, logins_before[1] + 1)
        ),
        what="sshd to log exactly one login on s1 and one on s2",
    )


async def test_more_concurrent_steps_than_the_servers_max_sessions(
    executor: SshExecutor, launches: Launches
) -> None:
    """OpenSSH allows 10 channels per connection; 14 steps at once still share one."""
    steps = [launches(command_step(f"c{i}", ["sleep", "0.3"])) for i in range(14)]

    results = await asyncio.gather(*(executor.run(launch) for launch in steps))

    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert executor.connections_opened == 1


async def test_a_closed_connection_is_reopened(executor: SshExecutor, launches: Launches) -> None:
    await executor.check("s1")
    conn = executor._hosts["s1"].conn
    assert conn is not None
    conn.close()
    await conn.wait_closed()

    result = await executor.run(launches(command_step("after", ["true"])))

    assert result.ok, result.error
    assert executor.connections_opened == 2


async def test_unknown_host_key_is_refused(
    ssh_hosts: Mapping[str, SshTarget], tmp_path: Path
) -> None:
    target = ssh_hosts["s1"]
    other_key = asyncssh.generate_private_key("ssh-ed25519")
    wrong = write_known_hosts(tmp_path / "wrong_known_hosts", {target.host: target.port}, other_key)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")

    for known_hosts in (wrong, empty):
        executor = SshExecutor(targets={"s1": replace(target, known_hosts=str(known_hosts))})
        try:
            with pytest.raises(HostUnreachable) as caught:
                await executor.check("s1")
        finally:
            await executor.aclose()
        message = str(caught.value)
        assert str(known_hosts) in message
        assert "host key is not trusted" in message
        assert f"[{target.host}]:{target.port}" in message
        assert isinstance(caught.value.__cause__, asyncssh.HostKeyNotVerifiable)
        assert executor.connections_opened == 0


async def test_missing_known_hosts_file_is_refused(
    ssh_hosts: Mapping[str, SshTarget], tmp_path: Path
) -> None:
    missing = tmp_path / "no_such_known_hosts"
    executor = SshExecutor(targets={"s1": replace(ssh_hosts["s1"], known_hosts=str(missing))})
    try:
        with pytest.raises(HostUnreachable, match=str(missing)):
            await executor.check("s1")
    finally:
        await executor.aclose()


async def test_closed_port_is_unreachable_quickly(
    ssh_hosts: Mapping[str, SshTarget], caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on 127.0.0.5 (the servers are on .2-.4).
    with socket.socket() as sock:
        sock.bind(("127.0.0.5", 0))
        port = sock.getsockname()[1]
    target = replace(ssh_hosts["s1"], host="127.0.0.5", port=port)

    executor = SshExecutor(targets={"dead": target})
    started = time.monotonic()
    try:
        # Real back-off delays (the default sleep): they are part of "quickly".
        with pytest.raises(HostUnreachable, match=rf"host 'dead' \(root@127\.0\.0\.5:{port}\)"):
            await executor.check("dead")
    finally:
        await executor.aclose()

    assert time.monotonic() - started < 5.0
    retried = [r for r in caplog.records if r.name == "aeventor.ssh"]
    assert len(retried) == CONNECT_ATTEMPTS - 1


# -- cancellation --------------------------------------------------------------------------


async def test_cancel_kills_the_remote_process_tree(
    executor: SshExecutor, launches: Launches, tmp_path: Path
) -> None:
    marker = f"aeventor-ssh-test-{uuid.uuid4().hex}"
    report = tmp_path / "report.json"
    launch = launches(function_step("sleeper", "spawn_and_sleep", marker, str(report)))
    files_before = await asyncio.to_thread(step_files)

    task = asyncio.create_task(executor.run(launch))
    await wait_until(report.exists, what="the remote step to start its children")
    tree = json.loads(report.read_text())
    assert launches.pids == [tree["pid"]]
    await wait_until(count(("-f", marker), 3), what="child, grandchild and sleeper to run")
    assert await pgrep("-g", str(tree["pid"])) >= {tree["pid"], *tree["children"]}

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_until(count(("-f", marker), 0), what="the marked processes to exit")
    await wait_until(
        count(("-g", str(tree["pid"])), 0), what="the step's process group to be empty"
    )
    # Its pid file is removed.
    assert await asyncio.to_thread(step_files) == files_before
    # The connection is still good for the next step.
    result = await executor.run(launches(command_step("next", ["true"])))
    assert result.ok, result.error
    assert executor.connections_opened == 1


async def test_cancel_of_a_command_step_kills_its_children(
    executor: SshExecutor, launches: Launches
) -> None:
    marker = f"aeventor-ssh-test-{uuid.uuid4().hex}"
    launch = launches(command_step("cmd", ["sh", "-c", "sleep 300 & sleep 300; wait", marker]))

    task = asyncio.create_task(executor.run(launch))
    await wait_until(lambda: bool(launches.pids), what="the command to start")
    pid = launches.pids[0]
    # The lifeline's watcher (a subshell) and its `cat` are in the group too.
    await wait_until(
        count(("-g", str(pid)), 5), what="the shell, its two sleeps, the watcher and its cat"
    )

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_until(
        count(("-g", str(pid)), 0),
        what="the command's process group to be empty",
    )
    await wait_until(count(("-f", marker), 0), what="the marked shell to exit")


async def test_cancel_while_the_channel_opens_still_kills_the_step(
    executor: SshExecutor, launches: Launches, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exec request went out, its reply is not in yet: the command runs all the same."""
    marker = f"aeventor-ssh-test-{uuid.uuid4().hex}"
    launch = launches(command_step("cmd", ["sh", "-c", "sleep 300; true", marker]))
    await executor.check("s1")
    conn = executor._hosts["s1"].conn
    assert conn is not None
    create_process = conn.create_process
    exec_sent, release = asyncio.Event(), asyncio.Event()

    async def slow_reply(*args: Any, **kwargs: Any) -> Any:
        # Control commands (the kill) go through untouched.
        if exec_sent.is_set():
            return await create_process(*args, **kwargs)
        process = await create_process(*args, **kwargs)
        exec_sent.set()
        await release.wait()
        return process

    monkeypatch.setattr(conn, "create_process", slow_reply)
    task = asyncio.create_task(executor.run(launch))
    await wait_until(exec_sent.is_set, what="the step's channel to open")
    await wait_until(count(("-f", marker), 1), what="the command to run")

    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_until(count(("-f", marker), 0), what="the command to be killed")
    assert launches.pids == []  # never reported as started


# -- the runner's pid_path -------------------------------------------------------------------


async def test_runner_leads_a_session_and_records_its_pid_when_given_a_pid_path(
    launches: Launches, tmp_path: Path
) -> None:
    """Started inside this process's session (as a non-OpenSSH server might start it)."""
    launch = launches(function_step("where", "where", "pid"))
    pid_path, result_path = tmp_path / "step.pid", tmp_path / "step.json"
    spec = build_spec(
        launch, result_path=str(result_path), sys_path=sys.path, pid_path=str(pid_path)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aeventor.backends.executors.runner", stdin=asyncio.subprocess.PIPE
    )
    await proc.communicate(json.dumps(spec).encode())

    assert proc.returncode == 0
    value = json.loads(result_path.read_text())["value"]
    assert value["pid"] == proc.pid
    assert value["sid"] == value["pgid"] == proc.pid
    assert pid_path.read_text() == f"{proc.pid}\n"
    # No temporary file left beside it.
    assert sorted(await asyncio.to_thread(os.listdir, tmp_path)) == ["step.json", "step.pid"]


# -- lifelines -------------------------------------------------------------------------------

AGENT = """\
import asyncio, json, sys
from pathlib import Path

from aeventor.dispatch.executor import StepLaunch
from aeventor.backends.executors.ssh import SshExecutor, SshTarget
from aeventor.dispatch.store import Claim
from aeventor.program.model import StepDef


async def main(config):
    targets = {name: SshTarget(**t) for name, t in config["targets"].items()}
    executor = SshExecutor(targets=targets, sys_path=config["sys_path"])

    async def started(pid):
        with open(config["started"], "a") as fh:
            fh.write(f"{pid}\\n")

    steps = [StepDef(host="s1", **step) for step in config["steps"]]
    launches = [
        StepLaunch(
            claim=Claim(id=i, run_id="run-1", step=s.name, sequence="0", recovery=0, attempt=1),
            step=s, program="prog", env={}, log_path=Path(config["logs"]) / f"{s.name}.log",
            deterministic_logs=True, on_started=started,
        )
        for i, s in enumerate(steps)
    ]
    await asyncio.gather(*(executor.run(launch) for launch in launches))


asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
"""


async def test_remote_steps_die_with_their_agent(
    ssh_hosts: Mapping[str, SshTarget], tmp_path: Path
) -> None:
    """SIGKILL the process that runs steps over SSH: sshd closes their channels, and the
    steps' lifelines take their remote process groups along."""
    marker = f"aeventor-ssh-test-{uuid.uuid4().hex}"
    report, started = tmp_path / "report.json", tmp_path / "started"
    config = {
        "targets": {
            name: {k: getattr(t, k) for k in t.__dataclass_fields__}
            for name, t in ssh_hosts.items()
        },
        "sys_path": sys.path,
        "started": str(started),
        "logs": str(tmp_path),
        "steps": [
            {
                "name": "func",
                "executor": "process",
                "target": f"{MODULE}:spawn_and_sleep",
                "args": [marker, str(report)],
            },
            {
                "name": "cmd",
                "executor": "command",
                "argv": ["sh", "-c", "sleep 300 & sleep 300; wait", marker],
            },
        ],
    }
    # In a file: the marker must not be in the agent's argv.
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "agent.py").write_text(AGENT)
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        str(tmp_path / "agent.py"),
        str(tmp_path / "config.json"),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    leaders: list[int] = []
    try:
        await wait_until(report.exists, what="the function step to start its children")
        await wait_until(
            lambda: len(started.read_text().split()) == 2 if started.exists() else False,
            what="both steps to report their pids",
        )
        leaders = [int(pid) for pid in started.read_text().split()]

        # Function step: child, grandchild, sleeper; command step: its shell, and (once it
        # forked) its lifeline watcher, a subshell that carries the same command line.
        async def all_marked() -> bool:
            return len(await pgrep("-f", marker)) >= 4

        await wait_until(all_marked, what="both steps' marked processes")
        # Each group holds its step and its lifeline's watcher (and the command's sleeps).
        for leader in leaders:
            assert len(await pgrep("-g", str(leader))) >= 3

        agent.kill()
        await agent.wait()

        await wait_until(count(("-f", marker), 0), what="the marked processes to exit", deadline=6)
        # Not pgrep: sshd is gone, and their zombies wait for init to reap them.
        for leader in leaders:
            await wait_until(
                lambda leader=leader: not session_members(leader),  # type: ignore[misc]
                what=f"step session {leader} to be empty",
                deadline=6,
            )
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        for leader in leaders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader, signal.SIGKILL)
