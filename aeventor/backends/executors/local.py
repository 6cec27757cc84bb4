"""Run steps on this host: subprocesses (functions and commands) and in-loop coroutines.

A ``warm`` function step is forked by a zygote of the executor's warm pool (see
:mod:`._warm` and :mod:`._zygote`) instead of starting an interpreter; it gets the same
session, log, lifeline, channel, environment and termination as a fresh ``process`` step.

Every subprocess starts in a session of its own, so a cancel or a timeout kills its whole
process group, grandchildren included. Its stdout and stderr go straight to the step's log
file (no pipe that could fill up); its result comes back through a small JSON file.

Every subprocess also gets a *lifeline* (see :mod:`._lifeline`): the read end of a pipe whose
write end this process alone holds, until the step has ended and been reaped. Should this
process die, even by SIGKILL, the step's process group is terminated within about
:data:`._lifeline.GRACE` seconds. The function runner watches its lifeline itself; a command
is started through a small supervisor (``python -I -S -c ...``, no aeventor import) that arms the lifeline
and then ``exec``-s the command, so the pid, exit status and output are the command's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...context import CHANNEL_ENV, EnvPolicy, bind_step, process_env
from ...dispatch.executor import ExecResult, StepLaunch
from ...dispatch.logs import step_log_capture, write_step_log
from ...exceptions import ExecutorError
from ...utils import describe_exception
from . import _lifeline, _zygote
from ._channel import Fire, serve_channel
from ._warm import WarmPool

if TYPE_CHECKING:
    from ...program.model import StepDef

__all__ = (
    "ExecResult",
    "LocalExecutor",
    "StepLaunch",
    "build_spec",
    "command_result",
    "decode_result",
)

#: Seconds a terminated step gets to exit before it is killed.
TERMINATE_GRACE = 5.0

#: Where this aeventor is imported from: the function runner finds it there even when this
#: process found it through a variable its steps do not inherit (``PYTHONPATH``, on agents).
#: Appended, so an aeventor installed for the step's interpreter comes first.
_AEVENTOR_ROOT = str(Path(__file__).parents[3])  # __file__ is absolute: no syscall at import
#: ``python -c`` starting the function runner (``python -m aeventor.backends.executors.runner``,
#: but with the path above); its arguments stay those the runner parses.
_RUNNER_BOOT = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from aeventor.backends.executors.runner import main; sys.exit(main())"
)


class LocalExecutor:
    """Runs steps on this host.

    Args:
        python: the interpreter for function steps (default: this one).
        sys_path: import path handed to function steps (default: this process's).
        env: which of this process's environment variables the steps inherit (default: a
            standalone run's, all but aeventor's secrets; agents pass
            :meth:`EnvPolicy.agent <aeventor.context.EnvPolicy.agent>`).
        warm: how many zygotes the warm pool runs (see :mod:`._warm`); 0: none, ``warm``
            steps then start a fresh interpreter, as ``process`` steps do.

    .. versionadded:: 0.1
    .. versionchanged:: 0.1
        ``warm``: the warm process pool.
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        sys_path: list[str] | None = None,
        env: EnvPolicy | None = None,
        warm: int = 1,
    ) -> None:
        self.python = python or sys.executable
        self.sys_path = list(sys.path if sys_path is None else sys_path)
        self.env_policy = EnvPolicy() if env is None else env
        self._tmpdir: str | None = None
        self._warm = (
            WarmPool(
                python=self.python,
                sys_path=self.sys_path,
                environ=lambda: self.env_policy.inherited(os.environ),
                aeventor_root=_AEVENTOR_ROOT,
                size=warm,
            )
            if warm
            else None
        )

    def prestart(self) -> None:
        """Start the warm pool's zygote now, in the background (call it in the loop that
        runs the steps); otherwise the first ``warm`` step starts it."""
        if self._warm is not None:
            self._warm.prestart()

    async def aclose(self) -> None:
        if self._warm is not None:
            await self._warm.aclose()
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            await asyncio.to_thread(shutil.rmtree, tmpdir, True)

    def fences(self, step: StepDef) -> bool:
        """Whether :meth:`run` calls ``launch.fence`` for ``step`` (see
        :attr:`StepLaunch.fence <aeventor.dispatch.executor.StepLaunch.fence>`): a warm
        function step, while there is a warm pool."""
        return step.executor == "warm" and step.target is not None and self._warm is not None

    async def run(self, launch: StepLaunch) -> ExecResult:
        """Run the step to its end; cancellation terminates it and propagates."""
        executor = launch.step.executor
        if launch.step.target is None and launch.step.argv is None:
            return ExecResult(ok=True)
        if executor == "inloop":
            return await self._run_inloop(launch)
        if executor == "command":
            assert launch.step.argv is not None
            return await self._run_command(launch, list(launch.step.argv))
        if executor == "warm" and self._warm is not None:
            return await self._run_warm(launch, self._warm)
        return await self._run_function(launch)

    # -- in-loop ------------------------------------------------------------------------

    async def _run_inloop(self, launch: StepLaunch) -> ExecResult:
        func, context = launch.func, launch.context
        if func is None or context is None:
            raise ExecutorError(
                f"step {launch.step.name!r} is an in-loop step and runs only in the process "
                "that defined it"
            )
        kwargs = dict(launch.step.kwargs)
        if launch.step.sequence_arg_name:
            kwargs[launch.step.sequence_arg_name] = context.sequence
        if launch.step.pass_logger:
            kwargs["logger"] = logging.getLogger(launch.env["EVENTOR_LOGGER_NAME"])
        lines: list[str] = []
        try:
            with (
                step_log_capture(
                    launch.env["EVENTOR_LOGGER_NAME"],
                    level=launch.log_level,
                    deterministic=launch.deterministic_logs,
                ) as lines,
                bind_step(context),
            ):
                value = await func(*launch.step.args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever a step raises is its failure
            # Formatting reads the source files (linecache): off the loop.
            error = await describe_exception(exc)
            lines.append(error.rstrip() + "\n")
            return ExecResult(ok=False, error=error)
        finally:
            # The step's log holds what it logged (and its error): written once it ended,
            # if there is anything to write.
            if lines:
                await asyncio.to_thread(write_step_log, launch.log_path, "".join(lines))
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return ExecResult(
                ok=False,
                error=(
                    f"SerializationError: step {launch.step.name!r} returned "
                    f"{type(value).__name__} ({exc}); return only JSON values"
                ),
            )
        return ExecResult(ok=True, value=value)

    # -- subprocesses -------------------------------------------------------------------

    async def _run_command(self, launch: StepLaunch, argv: list[str]) -> ExecResult:
        returncode = await self._spawn(launch, argv, stdin_data=None, supervise=True, channel=False)
        return command_result(argv, returncode)

    async def _run_function(self, launch: StepLaunch) -> ExecResult:
        tmpdir = await self._ensure_tmpdir()
        result_path = os.path.join(tmpdir, f"{launch.claim.id}-{launch.claim.attempt}.json")
        spec = build_spec(launch, result_path=result_path, sys_path=self.sys_path)
        argv = [self.python, "-c", _RUNNER_BOOT, _AEVENTOR_ROOT]
        returncode = await self._spawn(
            launch, argv, stdin_data=json.dumps(spec).encode(), supervise=False, channel=True
        )
        raw = await asyncio.to_thread(_read_result, result_path)
        return decode_result(launch, raw, returncode)

    async def _run_warm(self, launch: StepLaunch, pool: WarmPool) -> ExecResult:
        """A function step forked by the warm pool: what :meth:`_spawn` does for a fresh
        runner (log, lifeline, channel, session, termination), a fork instead of a start.

        With ``launch.fence`` the child is *gated*: forked, its session and lifeline set
        up, it waits until the fence (the worker's one transaction that checks the claim is
        still its own and records the pid) says whether it runs the step at all.
        """
        tmpdir = await self._ensure_tmpdir()
        result_path = os.path.join(tmpdir, f"{launch.claim.id}-{launch.claim.attempt}.json")
        spec = build_spec(launch, result_path=result_path, sys_path=self.sys_path)
        env = process_env(launch.env, self.env_policy)
        # The zygote opens the log: a relative path must not depend on its working directory.
        log_path = str(launch.log_path)
        if not launch.log_path.is_absolute():
            log_path = await asyncio.to_thread(os.path.abspath, log_path)
        lifeline = lifeline_w = gate = gate_w = -1
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        try:
            lifeline, lifeline_w = os.pipe()
            # Its one byte never waits (nobody else writes to it); non-blocking says so.
            os.set_blocking(lifeline_w, False)
            fds = [lifeline]
            if launch.on_trigger is not None:
                ours, theirs = socket.socketpair()
                fds.append(theirs.fileno())
            if launch.fence is not None:
                gate, gate_w = os.pipe()
                os.set_blocking(gate_w, False)  # as the lifeline's: one byte, never waits
                fds.append(gate)
            child = await pool.start(
                spec=spec,
                env=env,
                log_path=log_path,
                fds=fds,
                channel=theirs is not None,
                gate=gate >= 0,
                grace=TERMINATE_GRACE,
            )
        except BaseException:
            for fd in (lifeline_w, gate_w):
                if fd >= 0:
                    os.close(fd)
            if ours is not None:
                ours.close()
            raise
        finally:
            # The zygote has its copies (and the child its own): close ours without awaiting.
            for fd in (lifeline, gate):
                if fd >= 0:
                    os.close(fd)
            if theirs is not None:
                theirs.close()
        serving = (
            None
            if ours is None or launch.on_trigger is None
            else _Channel(ours, launch.on_trigger, name=f"aeventor channel {launch.step.name}")
        )
        run = True
        try:
            if launch.fence is None:
                await launch.on_started(child.pid)
            else:
                run = await launch.fence(child.pid)
                if run:
                    # (A child that died meanwhile left nobody to read it.)
                    with contextlib.suppress(OSError):
                        os.write(gate_w, _zygote.GATE_OPEN)
                # Closed either way: end-of-file without the byte sends the child away.
                os.close(gate_w)
                gate_w = -1
            returncode = await child.wait()
        except BaseException:
            await child.terminate(TERMINATE_GRACE)
            raise
        finally:
            if gate_w >= 0:
                os.close(gate_w)
            # (Reaped by its zygote when it has a return code.)
            await _after_step(child.returncode is not None, lifeline_w, serving)
        if not run:
            return ExecResult(
                ok=False, error=f"step {launch.step.name!r} was not started: fenced out"
            )
        if child.result is not None:
            return decode_result(launch, child.result, returncode)
        # None written (it crashed), or too large for its zygote to send.
        raw = await asyncio.to_thread(_read_result, result_path)
        return decode_result(launch, raw, returncode)

    async def _ensure_tmpdir(self) -> str:
        if self._tmpdir is None:
            self._tmpdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="aeventor-")
        return self._tmpdir

    async def _spawn(
        self,
        launch: StepLaunch,
        argv: list[str],
        *,
        stdin_data: bytes | None,
        supervise: bool,
        channel: bool,
    ) -> int:
        """Start ``argv`` with a lifeline, wait for its end, return its exit status.

        Args:
            supervise: start ``argv`` (a command) through the lifeline supervisor; if false,
                ``argv`` is the function runner, which arms its lifeline itself.
            channel: give the step a channel to its worker (a socket whose descriptor is in
                ``$EVENTOR_CHANNEL_FD``), over which it fires events
                (``aeventor.current_step().trigger``); served while it runs.
        """
        log_file = await _open_log_file(launch.log_path)
        # Both ends close-on-exec: the step gets the read end through pass_fds alone, and
        # no step (nor anything else this process runs) ever gets the write end.
        lifeline, lifeline_w = os.pipe()
        exec_error: int | None = None
        fds = [lifeline]
        if supervise:
            exec_error, exec_error_w = os.pipe()
            fds.append(exec_error_w)
            spawn = [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _lifeline.SUPERVISOR,
                str(lifeline),
                str(exec_error_w),
                *argv,
            ]
        else:
            spawn = [*argv, "--lifeline", str(lifeline)]
        ours: socket.socket | None = None
        extra_env: dict[str, str] = {}
        if channel and launch.on_trigger is not None:
            ours, theirs = socket.socketpair()
            fds.append(theirs.detach())  # closed by _start once the step has it
            extra_env[CHANNEL_ENV] = str(fds[-1])
        try:
            proc = await self._start(
                launch, spawn, log_file, fds, stdin_data=stdin_data, extra_env=extra_env
            )
        except BaseException:
            os.close(lifeline_w)
            if exec_error is not None:
                os.close(exec_error)
            if ours is not None:
                ours.close()
            raise
        serving = (
            None
            if ours is None or launch.on_trigger is None
            else _Channel(ours, launch.on_trigger, name=f"aeventor channel {launch.step.name}")
        )
        try:
            if exec_error is not None:
                # The supervisor's exec: end-of-file once it succeeded, errno if it failed.
                # The thread owns the descriptor, so a cancel does not leave it open.
                failed = await asyncio.to_thread(_read_and_close, exec_error)
                if failed:
                    await proc.wait()
                    code = int(failed)
                    exc = OSError(code, os.strerror(code), argv[0])
                    raise ExecutorError(
                        f"step {launch.step.name!r}: cannot start {argv[0]!r}: {exc}"
                    )
            await launch.on_started(proc.pid)
            if stdin_data is not None:
                assert proc.stdin is not None
                proc.stdin.write(stdin_data)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    await proc.stdin.drain()
                proc.stdin.close()
            return await proc.wait()
        except BaseException:
            await _terminate(proc)
            raise
        finally:
            await _after_step(proc.returncode is not None, lifeline_w, serving)

    async def _start(
        self,
        launch: StepLaunch,
        spawn: list[str],
        log_file: Any,
        fds: list[int],
        *,
        stdin_data: bytes | None,
        extra_env: Mapping[str, str] | None = None,
    ) -> asyncio.subprocess.Process:
        """Start the step's process; close the descriptors it inherits, and the log, here."""
        # Closed without awaiting (nothing was written to it): no cancel may land between
        # the start of the process and the try that terminates it.
        try:
            with log_file:
                return await asyncio.create_subprocess_exec(
                    *spawn,
                    stdin=asyncio.subprocess.PIPE
                    if stdin_data is not None
                    else asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**process_env(launch.env, self.env_policy), **(extra_env or {})},
                    start_new_session=True,
                    pass_fds=fds,
                )
        except OSError as exc:
            raise ExecutorError(
                f"step {launch.step.name!r}: cannot start {spawn[0]!r}: {exc}"
            ) from exc
        finally:
            for fd in fds:
                os.close(fd)


async def _serve_socket(sock: socket.socket, fire: Fire) -> None:
    """Serve the worker's end of a local step's channel (see :mod:`._channel`)."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    await serve_channel(reader, writer, fire)


class _Channel:
    """The worker's end of a local step's channel, served from the step's first message on.

    Most steps fire no event: watching the socket costs a loop reader, where serving it
    from the start cost a stream and a task per step. End-of-file before any message (the
    step, and whatever inherited its end, closed it) ends the watch.
    """

    def __init__(self, sock: socket.socket, fire: Fire, *, name: str) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fire = fire
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._sock.fileno())

    def _readable(self) -> None:
        try:
            first = self._sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # (still watched)
        except OSError:
            first = b""
        self._unwatch()
        if first:
            self._task = asyncio.create_task(_serve_socket(self._sock, self._fire), name=self._name)

    async def aclose(self) -> None:
        """Stop serving (the step has ended, or is being terminated) and close the socket."""
        self._unwatch()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        self._sock.close()  # (already closed with the channel's stream, if it was opened)


async def _open_log_file(path: Path) -> Any:
    """Open the step's log file for appending (its directory made), off the loop."""
    opening = asyncio.ensure_future(asyncio.to_thread(_open_log, path))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The thread opens the file whatever happens to us: close what it opened.
        await asyncio.wait([opening])
        if not opening.cancelled() and opening.exception() is None:
            opening.result().close()
        raise


def _read_and_close(fd: int) -> bytes:
    try:
        chunks = []
        while chunk := os.read(fd, 64):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _open_log(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def _read_result(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    os.unlink(path)
    return data


# -- shared with the SSH executor ------------------------------------------------------------


def build_spec(
    launch: StepLaunch,
    *,
    result_path: str,
    sys_path: Sequence[str],
    pid_path: str | None = None,
) -> dict[str, Any]:
    """The JSON spec ``python -m aeventor.backends.executors.runner`` reads on stdin for a function step.

    Args:
        result_path: where the runner writes its outcome (on the host it runs on).
        sys_path: the import path the runner prepends to its own.
        pid_path: when given, the runner starts a session of its own and writes its pid
            there (for launchers that cannot start it in a new session themselves).
    """
    step = launch.step
    spec: dict[str, Any] = {
        "step": step.name,
        "target": step.target,
        "main_path": step.main_path,
        "args": list(step.args),
        "kwargs": dict(step.kwargs),
        "sequence_arg_name": step.sequence_arg_name,
        "pass_logger": step.pass_logger,
        "sys_path": list(sys_path),
        # A user's script may read its arguments at module level; the runner loads it
        # with this process's sys.argv (as multiprocessing's spawn does).
        "argv": list(sys.argv),
        "deterministic_logs": launch.deterministic_logs,
        "log_level": launch.log_level,
        "result_path": result_path,
    }
    if pid_path is not None:
        spec["pid_path"] = pid_path
    return spec


def decode_result(
    launch: StepLaunch, raw: bytes | str | None, returncode: int | None
) -> ExecResult:
    """Turn what the runner wrote to its result file (None: nothing) into an :class:`ExecResult`."""
    outcome: Any = None
    if raw:
        try:
            outcome = json.loads(raw)
        except ValueError:  # half-written, or not UTF-8
            outcome = None
    if not isinstance(outcome, dict):
        return ExecResult(
            ok=False,
            error=(
                f"step {launch.step.name!r}: its process exited with {returncode} before "
                f"reporting a result (killed, or crashed); see {launch.log_path}"
            ),
        )
    if outcome.get("ok"):
        return ExecResult(ok=True, value=outcome.get("value"))
    return ExecResult(ok=False, error=str(outcome.get("error")))


def command_result(argv: Sequence[str], returncode: int | None) -> ExecResult:
    """The outcome of a command step that exited with ``returncode``."""
    if returncode == 0:
        return ExecResult(ok=True, value=0)
    return ExecResult(
        ok=False, value=returncode, error=f"command {argv[0]!r} exited with {returncode}"
    )


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, wait a grace period, then SIGKILL it."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(TERMINATE_GRACE):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    # Grandchildren may outlive the leader; the group id is still theirs.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _after_step(reaped: bool, lifeline_w: int, channel: _Channel | None) -> None:
    """Close what a step's launch opened. A step that ended and was reaped tells its watcher
    first, so that the watcher exits without touching what the step left behind (a step
    cancelled had its group, watcher included, killed)."""
    if reaped:
        with contextlib.suppress(OSError):
            os.write(lifeline_w, _lifeline.ENDED)
    os.close(lifeline_w)
    if channel is not None:
        await channel.aclose()
