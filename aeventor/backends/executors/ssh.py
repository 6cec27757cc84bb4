"""Run steps on SSH hosts (asyncssh), over one reused connection per host.

A step runs as one SSH "exec" channel whose command is a small POSIX ``sh`` script (so the
user's login shell does not matter): it prints ``aeventor-pid:$$`` on stderr, sends its
stderr where its stdout goes, and ``exec``-s the step: ``python -m aeventor.backends.executors.runner`` for a
function step (its JSON spec on stdin), the argv of a command step. ``exec`` keeps the pid,
so ``$$`` is the step's. The channel's stdout is copied into the step's local log file as it
arrives. A function step's outcome comes back as it does locally, through the runner's JSON
result file, read (and removed) by a second exec on the same connection.

How the pid is learnt: in band, on the channel's stderr, which carries nothing else once
the script runs. It arrives with the step's first output, before Python starts, with no
race and no extra channel; polling a pid file over further execs would cost a login shell
per attempt (each exec starts one; ~0.1 s with a heavy ``.bashrc``) and race the step's
own shell. If it does not come within :data:`PID_DEADLINE`, the step fails (and a cancel
before it came waits for it, up to that deadline, so it can kill what started). Function
steps still hand the runner a ``pid_path``: the runner then leads a session of its own if
sshd did not make it one, so ``kill -- -PID`` reaches its children on any server.

Why no ``setsid`` in front of commands: OpenSSH's sshd starts each session's command in a
new session (``setsid()`` before running the user's shell), so the shell, and whatever it
``exec``-s, leads its process group. ``setsid(1)`` in that position would fork (it does
when its caller leads a group): the channel would report the parent's exit at once while
the command ran on, orphaned. On servers that do not do this, a cancel falls back to
signalling the command's pid alone.

Cancelling a step signals its remote process group (``kill -TERM -- -PGID``), waits a grace
period for the channel to close, then sends ``SIGKILL`` to the group (grandchildren may
outlive the leader) and removes the step's temporary files. Control commands (reading a
result, killing) use channels that steps never take (see ``_Host``).

Remote processes are not killed when a channel closes, so each step holds a lifeline (see
:mod:`._lifeline`): the channel's stdin, which is never closed from this side. When the
agent dies, or its connection does, sshd closes it; if the step's leader still runs then,
its process group is terminated (SIGTERM, a grace of :data:`._lifeline.GRACE` s, SIGKILL).
A function step's runner reads its spec as the first line of stdin, then watches the rest
(``--lifeline 0``); a command step's script starts a ``sh`` watcher first (``_WATCHER``),
so commands still need no Python on their host.

A function step fires events (``aeventor.current_step().trigger``) over a channel to its
worker, as a local one does, with the same protocol (:mod:`._channel`): its host listens on
a Unix socket among the step's temporary files, whose path the step finds in
``$EVENTOR_CHANNEL_PATH``, and SSH forwards the step's connection to it back to this
process (``streamlocal-forward``, ``ssh -R PATH:...``). The step needs no database
connection; the socket is removed with the step's other files.

Differences from :class:`~aeventor.backends.executors.local.LocalExecutor`: a step ends when its
output is closed by every process that holds it (a daemon it spawns with inherited stdout
keeps the step running); a step's environment there is the login environment sshd gives it,
plus ``launch.env`` and the agent's variables its policy sends (``--pass-env``; see
:func:`aeventor.context.process_env`), passed as ``env K=V`` (not through sshd's
``AcceptEnv``), so they show on the remote host's process list while the step's shell starts;
nothing else of the agent's environment (no secret) is sent; the remote host needs ``python`` with aeventor importable, at the paths of this
process's ``sys.path``, for function steps.

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import re
import shlex
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import asyncssh
import tenacity

from ...context import CHANNEL_PATH_ENV, EnvPolicy, process_env
from ...exceptions import ConfigurationError, ExecutorError, HostUnreachable
from ...logs import get_logger
from ...utils import backoff
from . import _lifeline
from ._channel import Fire, serve_channel
from .local import (
    TERMINATE_GRACE,
    ExecResult,
    StepLaunch,
    _open_log,
    build_spec,
    command_result,
    decode_result,
)

__all__ = ("SshExecutor", "SshTarget", "backend_class")

log = get_logger("aeventor.ssh")

#: Connection attempts per host before :class:`HostUnreachable` (transient errors only).
CONNECT_ATTEMPTS = 3
#: Back-off between connection attempts (:func:`aeventor.utils.backoff`): full jitter
#: below ``BACKOFF_BASE * 2**(retry - 1)``, capped at ``BACKOFF_CAP``.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
#: Seconds a step's script may take to announce its pid once its channel is open.
PID_DEADLINE = 10.0
#: Seconds a short control command (read a result, kill, clean up) may take.
CONTROL_TIMEOUT = 30.0
#: Channels per connection kept for control commands; steps use the rest (see ``_Host``).
CONTROL_CHANNELS = 2
#: Seconds between keepalives, and unanswered ones before a connection counts as lost.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 3
#: Bytes read from a step's output at a time.
CHUNK = 64 * 1024
#: The longest path of a step's channel socket (``sun_path`` holds 104 bytes on BSDs and
#: macOS, 108 on Linux, the final NUL included).
_SOCKET_PATH_MAX = 103

_Process = asyncssh.SSHClientProcess[bytes]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: errno values of network failures worth another connection attempt.
_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
)


@dataclass(frozen=True, slots=True)
class SshTarget:
    """How to reach one SSH host.

    Args:
        host: name or address.
        port: TCP port.
        user: login name (default: asyncssh's, the local user or ``~/.ssh/config``).
        client_keys: private key files (default: asyncssh's, ``~/.ssh/id_*`` and the agent).
        known_hosts: the known_hosts file the host key must be in (default:
            ``~/.ssh/known_hosts``). Host keys are always checked: there is no way to turn
            that off here.
        python: the remote interpreter for function steps; aeventor must be importable by it.
        connect_timeout: seconds a connection attempt may take.
        max_sessions: channels the server allows per connection (OpenSSH's ``MaxSessions``,
            10 by default). Two are kept for control commands, so at most
            ``max_sessions - 2`` steps run on the host at once; more wait for a slot.
        tmpdir: remote directory for the steps' pid and result files.

    .. versionadded:: 0.1
    """

    host: str
    port: int = 22
    user: str | None = None
    client_keys: Sequence[str] | None = None
    known_hosts: str | None = None
    python: str = "python3"
    connect_timeout: float = 10.0
    max_sessions: int = 10
    tmpdir: str = "/tmp"

    def __post_init__(self) -> None:
        if self.max_sessions <= CONTROL_CHANNELS:
            raise ConfigurationError(
                f"SshTarget(host={self.host!r}): max_sessions={self.max_sessions} leaves no "
                f"channel for steps; it must be more than {CONTROL_CHANNELS} (the server's "
                "MaxSessions, 10 by default for OpenSSH)"
            )

    @property
    def known_hosts_path(self) -> str:
        return self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")

    @property
    def known_hosts_entry(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


class _Host:
    """One host's connection, and the channels steps and control commands may use on it.

    The server caps the channels of one connection (OpenSSH's ``MaxSessions``). A running
    step holds one channel for as long as it runs; reading its result, or killing it, takes a
    second one briefly. Steps take slots of ``steps``; control commands take those of
    ``control``, which steps never use, so a cancel can always reach the server even when
    every step slot holds a long-running step.
    """

    def __init__(self, name: str, target: SshTarget) -> None:
        self.name = name
        self.target = target
        self.lock = asyncio.Lock()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.steps = asyncio.Semaphore(target.max_sessions - CONTROL_CHANNELS)
        self.control = asyncio.Semaphore(CONTROL_CHANNELS)

    @property
    def label(self) -> str:
        t = self.target
        user = f"{t.user}@" if t.user else ""
        return f"host {self.name!r} ({user}{t.host}:{t.port})"


class SshExecutor:
    """Runs function and command steps on SSH hosts, one reused connection per host.

    The host of a step is ``launch.step.host``, a key of ``targets``. Each connection opens
    on first use and is reused by every step on that host; one found closed is reopened.

    Args:
        targets: host name -> how to reach it.
        sleep: awaited for the delays between connection attempts (inject a no-op in
            tests).
        sys_path: import path handed to function steps (default: this process's; the hosts
            are expected to share the software, at the same paths).
        env: which of this process's environment variables are sent to the steps (its
            ``remote`` patterns; default: none).

    Attributes:
        connections_opened: how many SSH connections this executor opened so far.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        targets: Mapping[str, SshTarget],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        sys_path: Sequence[str] | None = None,
        env: EnvPolicy | None = None,
    ) -> None:
        self._hosts = {name: _Host(name, target) for name, target in targets.items()}
        self.env_policy = EnvPolicy() if env is None else env
        self._sleep = sleep
        self.sys_path = list(sys.path if sys_path is None else sys_path)
        self.connections_opened = 0

    async def aclose(self) -> None:
        """Close every connection (steps still running on them are cut off)."""
        for host in self._hosts.values():
            async with host.lock:
                conn, host.conn = host.conn, None
            if conn is not None:
                conn.close()
                await conn.wait_closed()

    async def check(self, host: str) -> None:
        """Connect to ``host`` (or reuse its connection) and run ``true`` there.

        Raises:
            HostUnreachable: the host cannot be reached, authenticated or trusted.
        """
        h = self._host(host)
        result = await self._control(h, "true", doing="running `true`")
        if result.returncode != 0:
            raise HostUnreachable(
                f"{h.label}: `true` exited with {result.returncode}: {result.stderr!r}"
            )

    async def shell(
        self, host: str, command: str, *, input: bytes | None = None
    ) -> tuple[int, str, str]:
        """Run a short shell command on ``host`` over its connection.

        Args:
            input: written to the command's stdin, which is then closed (default: none).
                Unlike the command, it shows in no process list on the host.

        Returns:
            The exit status, stdout and stderr.
        """
        h = self._host(host)
        result = await self._control(
            h, command, doing=f"running {command.split()[0]!r}", input=input
        )
        return result.returncode or 0, _text(result.stdout), _text(result.stderr)

    async def run(self, launch: StepLaunch) -> ExecResult:
        """Run the step on its host to its end; cancellation kills it there and propagates.

        Raises:
            HostUnreachable: the host cannot be reached, or the connection was lost.
            ExecutorError: the step cannot run over SSH, or could not be started.
        """
        step = launch.step
        if step.target is None and step.argv is None:
            return ExecResult(ok=True)
        if step.executor == "inloop":
            raise ExecutorError(
                f"step {step.name!r} is an in-loop step and cannot run on an SSH host"
            )
        if step.host is None:
            raise ExecutorError(f"step {step.name!r} names no host to run on over SSH")
        host = self._host(step.host)
        files = _StepFiles.new(host.target.tmpdir)
        step_env = process_env(launch.env, self.env_policy, remote=True)
        if step.executor == "command":
            assert step.argv is not None
            argv = list(step.argv)
            env = _env_prefix(launch, step_env)
            script = f"{_PRELUDE} {_WATCHER} exec {env}{shlex.join(argv)} 3<&-"
            returncode = await self._run_remote(host, launch, script, files, stdin_data=b"")
            return command_result(argv, returncode)
        spec = build_spec(
            launch, result_path=files.result, sys_path=self.sys_path, pid_path=files.pid
        )
        runner = [host.target.python, *_RUNNER, "--lifeline", "0"]
        async with self._channel(host, launch, files) as channel_env:
            env = _env_prefix(launch, {**step_env, **channel_env})
            script = f"{_PRELUDE} exec {env}{shlex.join(runner)}"
            returncode = await self._run_remote(
                host, launch, script, files, stdin_data=json.dumps(spec).encode() + b"\n"
            )
        result = await self._control(
            host,
            f"cat {shlex.quote(files.result)} 2>/dev/null; {files.remove()}",
            doing="reading the step's result",
        )
        return decode_result(launch, result.stdout, returncode)

    # -- connections ---------------------------------------------------------------------

    def _host(self, name: str) -> _Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise ExecutorError(
                f"unknown SSH host {name!r}; known hosts: {sorted(self._hosts)}"
            ) from None

    async def _connection(self, host: _Host) -> asyncssh.SSHClientConnection:
        async with host.lock:
            if host.conn is None or host.conn.is_closed():
                host.conn = None
                host.conn = await self._connect(host)
                self.connections_opened += 1
            return host.conn

    async def _forget(self, host: _Host, conn: asyncssh.SSHClientConnection) -> None:
        async with host.lock:
            if host.conn is conn:
                host.conn = None
        conn.close()

    async def _connect(self, host: _Host) -> asyncssh.SSHClientConnection:
        t = host.target
        options: dict[str, Any] = {
            "port": t.port,
            "connect_timeout": t.connect_timeout,
            "keepalive_interval": KEEPALIVE_INTERVAL,
            "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        }
        if t.user is not None:
            options["username"] = t.user
        if t.client_keys is not None:
            options["client_keys"] = list(t.client_keys)
        if t.known_hosts is not None:
            # Left out, asyncssh reads ~/.ssh/known_hosts. Never None: that disables checking.
            options["known_hosts"] = t.known_hosts
        retrying = backoff(
            initial=BACKOFF_BASE,
            maximum=BACKOFF_CAP,
            # Each attempt is bounded by connect_timeout. A refused login or an unknown host
            # key is not retried.
            stop=tenacity.stop_after_attempt(CONNECT_ATTEMPTS),
            retry_on=_transient,
            sleep=self._sleep,
            log=log,
            event="SSH connection failed; retrying",
            host=host.name,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await asyncssh.connect(t.host, **options)
        except (asyncssh.Error, OSError, ValueError) as exc:
            raise _translate(host, exc, "connecting") from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _open(
        self,
        host: _Host,
        command: str,
        *,
        abandon: Callable[[_Process], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> _Process:
        """Open a channel running ``command``; reconnect once if the connection was dead.

        Args:
            abandon: stops the command if we are cancelled while its channel opens
                (default: close the channel).
        """
        for reconnected in (False, True):
            conn = await self._connection(host)
            opening: asyncio.Future[_Process] = asyncio.ensure_future(
                conn.create_process(command, encoding=None, **kwargs)
            )
            try:
                with _wrap_exceptions(host, "opening a channel"):
                    # Shielded: once the exec request is sent, the command starts on the
                    # host whether or not we still wait for the reply.
                    return await asyncio.shield(opening)
            except asyncio.CancelledError:
                await _abandon(host, opening, abandon)
                raise
            except ExecutorError:
                if reconnected or not conn.is_closed():
                    raise
                await self._forget(host, conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _control(
        self, host: _Host, command: str, *, doing: str, input: bytes | None = None
    ) -> asyncssh.SSHCompletedProcess:
        """Run a short control command to its end on a control channel."""
        async with host.control:
            process = await self._open(
                host, command, stdin=asyncssh.DEVNULL if input is None else asyncssh.PIPE
            )
            try:
                with _wrap_exceptions(host, doing):
                    async with asyncio.timeout(CONTROL_TIMEOUT):
                        if input is not None:
                            process.stdin.write(input)
                            process.stdin.write_eof()
                        return await process.wait()
            finally:
                process.close()

    # -- the steps' channels -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _channel(
        self, host: _Host, launch: StepLaunch, files: _StepFiles
    ) -> AsyncIterator[dict[str, str]]:
        """The channel of a function step to its worker, for the block: yields the variables
        that name it to the step (none when it has no channel).

        The step's host listens on a Unix socket among the step's temporary files (sshd
        creates it mode 0600, owned by the login user), and SSH forwards each connection to
        it back here (OpenSSH's ``streamlocal-forward``, as ``ssh -R PATH:...`` does), where
        :func:`._channel.serve_channel` serves it, as it serves a local step's socket pair.
        The step connects when it first calls ``current_step()``. A server that refuses the
        forwarding (``AllowStreamLocalForwarding no``) runs the step without a channel.
        """
        fire = launch.on_trigger
        if fire is None:
            yield {}
            return
        path = files.channel
        if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
            log.warning(
                "step.channel_unavailable",
                host=host.name,
                step=launch.step.name,
                reason=f"the socket path {path!r} is longer than {_SOCKET_PATH_MAX} bytes; "
                "give the host a shorter tmpdir",
            )
            yield {}
            return
        served = _Served(launch.step.name, fire)
        listener = await self._listen(host, path, served.accept, launch)
        if listener is None:
            yield {}
            return
        failed = False
        try:
            yield {CHANNEL_PATH_ENV: path}
        except BaseException:
            failed = True
            raise
        finally:
            listener.close()
            try:
                await served.aclose()
            finally:
                await self._closed(host, listener, path, remove=failed)

    async def _listen(
        self,
        host: _Host,
        path: str,
        accept: Callable[[], Callable[[_Reader, _Writer], None]],
        launch: StepLaunch,
    ) -> asyncssh.SSHListener | None:
        """Have the host listen on ``path`` for the step; None if its server refuses to."""
        for reconnected in (False, True):
            conn = await self._connection(host)
            listening = asyncio.ensure_future(conn.start_unix_server(accept, path, encoding=None))
            try:
                with _wrap_exceptions(host, "forwarding a step's channel"):
                    try:
                        # Shielded: once the request is sent, the host listens whether or
                        # not we still wait for its reply (closed below if we do not).
                        return await asyncio.shield(listening)
                    except asyncssh.ChannelListenError:
                        if conn.is_closed():
                            raise asyncssh.ConnectionLost(
                                "the connection closed while the step's channel was set up"
                            ) from None
                        log.warning(
                            "step.channel_unavailable",
                            host=host.name,
                            step=launch.step.name,
                            reason="the SSH server refused to listen on a Unix socket for "
                            "the step (sshd_config: AllowStreamLocalForwarding); the step "
                            "runs without a channel (current_step() is not available to it)",
                        )
                        return None
            except asyncio.CancelledError:
                await asyncio.wait([listening], timeout=CONTROL_TIMEOUT)
                if listening.done() and not listening.cancelled() and not listening.exception():
                    listener = listening.result()
                    listener.close()
                    await self._closed(host, listener, path, remove=True)
                else:
                    listening.cancel()
                raise
            except ExecutorError:
                if reconnected or not conn.is_closed():
                    raise
                await self._forget(host, conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _closed(
        self, host: _Host, listener: asyncssh.SSHListener, path: str, *, remove: bool
    ) -> None:
        """Wait until the host stopped listening on ``path``; with ``remove``, remove the
        socket too (sshd leaves it behind; a step that ended, or was stopped once its pid
        was known, had it removed with its other files)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONTROL_TIMEOUT):
                await listener.wait_closed()
        if not remove:
            return
        try:
            await self._control(
                host, f"rm -f {shlex.quote(path)}", doing="removing a step's channel"
            )
        except ExecutorError as exc:
            log.warning("could not remove a step's channel", host=host.name, error=str(exc))

    # -- steps ---------------------------------------------------------------------------

    async def _run_remote(
        self,
        host: _Host,
        launch: StepLaunch,
        script: str,
        files: _StepFiles,
        *,
        stdin_data: bytes,
    ) -> int:
        """Run ``script`` in a step channel, its output into the log; return its exit code.

        ``stdin_data`` is written to the channel, which is then kept open: it is the step's
        lifeline (see the module's docstring).
        """
        command = f"exec sh -c {shlex.quote(script)}"
        async with host.steps:
            log_file = await asyncio.to_thread(_open_log, launch.log_path)
            try:
                process = await self._open(
                    host,
                    command,
                    abandon=functools.partial(self._stop, host, log_file, files),
                    stdin=asyncssh.PIPE,
                )
                output = _Output(host, process, log_file)
                try:
                    if stdin_data:
                        with _wrap_exceptions(host, "sending the step's spec"):
                            process.stdin.write(stdin_data)
                            await process.stdin.drain()
                    pid = await output.wait_pid(launch)
                    await launch.on_started(pid)
                    await output.wait_closed()
                    with _wrap_exceptions(host, f"running step {launch.step.name!r}"):
                        await process.wait()
                    if process.returncode is None:
                        raise HostUnreachable(
                            f"{host.label}: the channel of step {launch.step.name!r} closed "
                            "without an exit status (connection lost?)"
                        )
                    return process.returncode
                except BaseException:
                    # The readers keep the log fed (and may yet learn the pid) while the
                    # step is stopped.
                    await self._terminate(host, process, output, files)
                    await output.aclose()
                    raise
            finally:
                await asyncio.to_thread(log_file.close)

    async def _stop(
        self, host: _Host, log_file: IO[bytes], files: _StepFiles, process: _Process
    ) -> None:
        """Stop a step whose channel opened after we were cancelled."""
        output = _Output(host, process, log_file)
        try:
            await self._terminate(host, process, output, files)
        finally:
            await output.aclose()

    async def _terminate(
        self,
        host: _Host,
        process: _Process,
        output: _Output,
        files: _StepFiles,
    ) -> None:
        """SIGTERM the step's process group, wait a grace period, SIGKILL it, clean up.

        Failures are logged, not raised: this runs while another exception (often a
        cancellation) propagates, and must not replace it.
        """
        try:
            # Cancelled while starting: the pid is on its way (or the step never started).
            pid = await output.pid_within_deadline()
            if pid is None:
                if not process.is_closing():
                    log.warning(
                        "remote step did not report its pid; closing its channel",
                        host=host.name,
                    )
            else:
                if process.returncode is None:
                    await self._control(host, _kill(pid, "TERM"), doing="stopping a step")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(TERMINATE_GRACE):
                            await process.wait_closed()
                # Grandchildren may outlive the leader; the group id is still theirs.
                await self._control(
                    host, f"{_kill(pid, 'KILL')}; {files.remove()}", doing="killing a step"
                )
        except ExecutorError as exc:
            log.warning("could not stop a remote step", host=host.name, error=str(exc))
        finally:
            process.close()


# -- remote commands -------------------------------------------------------------------------


def _kill_sh(pid: str, signal: str, *, dash: bool = False) -> str:
    """``kill`` the group ``pid`` leads, or ``pid`` alone if it leads none.

    Args:
        dash: for ``sh`` scripts: dash's ``kill`` rejects ``--`` ("Illegal number"), and
            takes ``-SIG -PGID`` as bash does.
    """
    group = f"-{pid}" if dash else f"-- -{pid}"
    return f"{{ kill -{signal} {group} || kill -{signal} {pid}; }} 2>/dev/null; true"


#: What every step's script does first: tell its pid on stderr (which carries nothing
#: else), then send its stderr where its stdout goes (so the log keeps their order).
#: ``$$`` is the step's pid: the script ``exec``-s it.
_PID_MARK = b"aeventor-pid:"
_PRELUDE = f"echo {_PID_MARK.decode()}$$ >&2; exec 2>&1;"
_RUNNER = ("-m", "aeventor.backends.executors.runner")
#: A command step's lifeline watcher (a function step's runner has its own, in Python; a
#: command needs no Python on its host): a process of the step's group, orphaned at once
#: (double fork: the command does not get a child it did not start), that reads the
#: channel's stdin until it closes. If the step's shell (``$$``, which the command
#: replaces) still exists then, the agent or its connection is gone: it terminates the
#: group, as :mod:`._lifeline` does. It ignores SIGTERM (so does the ``cat`` it starts)
#: and holds none of the channel's output. The command's stdin stays ``/dev/null``-like,
#: as it was when the channel's stdin was closed at once.
_WATCHER = (
    "exec 3<&0 </dev/null; ( ( trap '' TERM INT HUP; cat <&3 >/dev/null 2>&1; "
    "kill -0 $$ 2>/dev/null || exit 0; "
    f"{_kill_sh('$$', 'TERM', dash=True)}; sleep {_lifeline.GRACE:g}; "
    f"{_kill_sh('$$', 'KILL', dash=True)} "
    ") >/dev/null 2>&1 & );"
)


@dataclass(frozen=True, slots=True)
class _StepFiles:
    """A step's remote temporary files."""

    stem: str

    @classmethod
    def new(cls, tmpdir: str) -> _StepFiles:
        return cls(stem=os.path.join(tmpdir, f"aeventor-{uuid.uuid4().hex}"))

    @property
    def pid(self) -> str:
        return f"{self.stem}.pid"

    @property
    def result(self) -> str:
        return f"{self.stem}.json"

    @property
    def channel(self) -> str:
        """The Unix socket the step reaches its worker through (see ``_channel``)."""
        return f"{self.stem}.sock"

    def remove(self) -> str:
        """A command removing every file of the step (the runner's temporary one included)."""
        return f"rm -f {shlex.quote(self.stem)}.*"


def _env_prefix(launch: StepLaunch, env: Mapping[str, str]) -> str:
    """``env K=V ...`` for the step's variables (sshd's AcceptEnv is not relied upon)."""
    for name in env:
        if not _ENV_NAME.match(name):
            raise ExecutorError(
                f"step {launch.step.name!r}: environment variable name {name!r} cannot be "
                "passed to a remote command"
            )
    if not env:
        return ""
    return "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "


def _kill(pid: int, signal: str) -> str:
    """Signal the step's process group (or the step alone, on a server that did not make it
    lead one: sshd's other than OpenSSH's, before the runner's ``setsid``)."""
    return _kill_sh(str(pid), signal)


async def _abandon(
    host: _Host,
    opening: asyncio.Future[_Process],
    abandon: Callable[[_Process], Awaitable[None]] | None,
) -> None:
    """We were cancelled while ``opening`` opened a channel: let it finish, then stop it."""
    done, _ = await asyncio.wait([opening], timeout=CONTROL_TIMEOUT)
    if not done:
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        log.warning("a channel did not open in time; abandoned it", host=host.name)
        return
    if opening.exception() is not None:
        return  # nothing started
    process = opening.result()
    if abandon is None:
        process.close()
    else:
        await abandon(process)


_Reader = asyncssh.SSHReader[bytes]
_Writer = asyncssh.SSHWriter[bytes]


async def _serve_forwarded(reader: _Reader, writer: _Writer, fire: Fire) -> None:
    """Serve one forwarded connection to a step's channel (see :mod:`._channel`)."""
    try:
        await serve_channel(reader, writer, fire)
    except asyncssh.Error:
        pass  # the connection went away mid-message, as serve_channel's ConnectionError


class _Served:
    """The connections a step made to its channel, each served in a task of this set until
    the step closes it, or until :meth:`aclose` (the step ended)."""

    def __init__(self, name: str, fire: Fire) -> None:
        self.name = name
        self.fire = fire
        self._tasks: set[asyncio.Task[None]] = set()

    def accept(self) -> Callable[[_Reader, _Writer], None]:
        """asyncssh's ``handler_factory``: every forwarded connection is accepted."""
        return self._start

    def _start(self, reader: _Reader, writer: _Writer) -> None:
        # Our task, not asyncssh's (which would only log its failure): aclose() awaits it.
        self._tasks.add(
            asyncio.create_task(
                _serve_forwarded(reader, writer, self.fire), name=f"aeventor channel {self.name}"
            )
        )

    async def aclose(self) -> None:
        """Stop serving; raise what a connection's task raised (a bug: serve_channel answers
        the step with the errors it expects)."""
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


class _Output:
    """Copies a step channel's stdout to the log, and finds the pid its stderr announces.

    Anything else on stderr (a login shell's complaints, before the step's script runs)
    goes to the log too.
    """

    def __init__(self, host: _Host, process: _Process, log_file: IO[bytes]) -> None:
        self.host = host
        self.process = process
        self.log_file = log_file
        self.pid: int | None = None
        #: Set once the pid is known, or stderr ended without it.
        self.pid_known = asyncio.Event()
        self._pid_deadline = asyncio.get_running_loop().time() + PID_DEADLINE
        self._stdout = asyncio.create_task(self._copy(process.stdout))
        self._stderr = asyncio.create_task(self._copy_stderr())

    async def wait_pid(self, launch: StepLaunch) -> int:
        """The step's pid, as soon as it announces it.

        Raises:
            ExecutorError: the step's script did not start within :data:`PID_DEADLINE`, or
                its channel ended first.
        """
        pid = await self.pid_within_deadline()
        if pid is not None:
            return pid
        if self._stderr.done():
            await self._stderr  # its failure (a lost connection) says more than we can
            with _wrap_exceptions(self.host, "waiting for a step that did not start"):
                async with asyncio.timeout(CONTROL_TIMEOUT):
                    await self.process.wait()
            raise ExecutorError(
                f"step {launch.step.name!r} on {self.host.label}: its remote shell exited "
                f"with {self.process.returncode} before starting it; see {launch.log_path}"
            )
        raise ExecutorError(
            f"step {launch.step.name!r} on {self.host.label}: its remote shell did not "
            f"start it within {PID_DEADLINE} s; see {launch.log_path}"
        )

    async def pid_within_deadline(self) -> int | None:
        """The pid, waiting for it until :data:`PID_DEADLINE` after the channel opened."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._pid_deadline):
                await self.pid_known.wait()
        return self.pid

    async def wait_closed(self) -> None:
        """Wait until the step's output has ended; raise what a reader raised."""
        await self._stdout
        await self._stderr

    async def aclose(self) -> None:
        for task in (self._stdout, self._stderr):
            task.cancel()
        await asyncio.gather(self._stdout, self._stderr, return_exceptions=True)

    async def _copy_stderr(self) -> None:
        try:
            while self.pid is None:
                with _wrap_exceptions(self.host, "reading a step's output"):
                    line = await self.process.stderr.readline()
                if not line:
                    return
                text = line.strip()
                if text.startswith(_PID_MARK) and text[len(_PID_MARK) :].isdigit():
                    self.pid = int(text[len(_PID_MARK) :])
                    self.pid_known.set()
                else:
                    await asyncio.to_thread(_append, self.log_file, line)
        finally:
            self.pid_known.set()
        await self._copy(self.process.stderr)

    async def _copy(self, stream: asyncssh.SSHReader[bytes]) -> None:
        while True:
            with _wrap_exceptions(self.host, "reading a step's output"):
                chunk = await stream.read(CHUNK)
            if not chunk:
                return
            await asyncio.to_thread(_append, self.log_file, chunk)


def _append(log_file: IO[bytes], chunk: bytes) -> None:
    log_file.write(chunk)
    log_file.flush()  # readers of the log see the step's output as it comes


# -- errors ----------------------------------------------------------------------------------


def _transient(exc: BaseException) -> bool:
    """Whether another connection attempt may succeed."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable | asyncssh.PermissionDenied):
        return False
    if isinstance(exc, TimeoutError | ConnectionError | asyncssh.ConnectionLost):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _translate(host: _Host, exc: BaseException, doing: str) -> ExecutorError:
    t = host.target
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostUnreachable(
            f"{host.label}: its host key is not trusted ({exc.reason}): known_hosts file "
            f"{t.known_hosts_path} has no matching key for {t.known_hosts_entry}. If the key "
            "is new and genuine, add it there (ssh-keyscan, then check its fingerprint); a "
            "changed key may mean the host was reinstalled, or an attack"
        )
    if isinstance(exc, FileNotFoundError) and exc.filename == t.known_hosts:
        return HostUnreachable(
            f"{host.label}: known_hosts file {t.known_hosts_path} does not exist"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        keys = ", ".join(t.client_keys) if t.client_keys is not None else "the default keys"
        return HostUnreachable(
            f"{host.label}: the server refused the login of user {t.user or '(default)'} "
            f"with {keys} ({exc.reason})"
        )
    if isinstance(exc, asyncssh.ChannelOpenError):
        return ExecutorError(f"{host.label}: the server refused a channel: {exc.reason}")
    if isinstance(exc, asyncssh.DisconnectError):
        return HostUnreachable(f"{host.label}: connection lost while {doing}: {exc.reason}")
    if isinstance(exc, TimeoutError):
        return HostUnreachable(f"{host.label}: timed out while {doing}")
    if isinstance(exc, OSError):
        return HostUnreachable(f"{host.label}: {doing} failed: {exc}")
    if isinstance(exc, asyncssh.Error):
        return ExecutorError(f"{host.label}: {doing} failed: {exc.reason}")
    # asyncssh.KeyImportError and other bad options.
    return ExecutorError(f"{host.label}: {doing} failed: {exc}")


@contextlib.contextmanager
def _wrap_exceptions(host: _Host, doing: str) -> Iterator[None]:
    """Re-raise asyncssh and socket errors as :class:`ExecutorError` (chained)."""
    try:
        yield
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        raise _translate(host, exc, doing) from exc


backend_class = SshExecutor


def _text(data: object) -> str:
    """Channel output as text: control channels are opened in bytes mode."""
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode(errors="replace")
    return "" if data is None else str(data)
