"""The executor's side of the warm pool: zygotes (:mod:`._zygote`) that fork warm steps.

A :class:`WarmPool` belongs to one :class:`~aeventor.backends.executors.local.LocalExecutor`
(a standalone run's, or an agent's). It starts its zygotes lazily (or on
:meth:`WarmPool.prestart`), each a ``python -I`` process in a session of its own, and talks to
each over a Unix socket pair read by a loop callback (no task per zygote). A step run is
one request: the step's spec, environment, working directory and log file's path as a
JSON line, its lifeline, channel and gate as descriptors (``SCM_RIGHTS``); the answer is the
child's pid, then, once the zygote reaped it, its exit status and (read by the zygote) its
result. The step's process group is signalled
from here, as for a fresh process: the child leads its own session.

A zygote that dies (killed, or crashed) fails the step runs it still had running with an
:class:`~aeventor.exceptions.ExecutorError` (their process groups are killed; a child whose
zygote died also gets SIGTERM from its parent-death signal) and is replaced by the next
request. A zygote that *retires* (an import started threads, or a preloaded module changed
on disk) forks no more but still reports its children's ends; the request is asked again of
a new zygote, and the retired one is closed once its last child ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...exceptions import ExecutorError
from ...logs import get_logger
from . import _zygote

__all__ = ("WarmChild", "WarmPool")

log = get_logger("aeventor.warm")

#: Seconds a zygote may take to start and import the step runner.
START_TIMEOUT = 60.0
#: How many zygotes a request may be asked of when they retire (see the module's doc).
ATTEMPTS = 3
#: Seconds a zygote may spend importing a step's module (while it does, it forks no other
#: step); a slower import is done in each step's own process instead.
PRELOAD_LIMIT = 10.0


class _Retired(Exception):
    """A zygote answered a request with ``retire``: ask a new one."""

    def __init__(self, reason: str, *, preload: bool) -> None:
        super().__init__(reason)
        self.preload = preload


class _Gone(ExecutorError):
    """The zygote was gone before the request was sent: ask another."""


class _Zygote:
    """One zygote process and its control socket."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.alive = True
        self.retiring = False
        self.fatal: str | None = None
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.starts: dict[int, asyncio.Future[int]] = {}
        self.exits: dict[int, asyncio.Future[tuple[int, str | None]]] = {}
        self.send_lock = asyncio.Lock()
        self._buffer = b""
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    @property
    def load(self) -> int:
        return len(self.exits)

    # -- reading ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            try:
                message = json.loads(line)
                self._dispatch(message)
            except (ValueError, KeyError, TypeError) as exc:
                # Not what a zygote says: it cannot be trusted with more steps.
                self.fatal = f"unreadable message {line[:200]!r} ({exc})"
                self.kill()
                self._lost()
                return

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            if not self.ready.done():
                self.ready.set_result(int(message["ready"]))
            if int(message.get("threads", 1)) > 1:
                log.warning("warm.zygote_threads", pid=self.pid, threads=message["threads"])
            return
        if "fatal" in message:
            self.fatal = str(message["fatal"])
            log.error("warm.zygote_fatal", pid=self.pid, error=self.fatal)
            return
        rid = int(message["id"])
        if "exit" in message:
            done = self.exits.pop(rid, None)
            if done is not None and not done.done():
                result = message.get("result")
                done.set_result((int(message["exit"]), None if result is None else str(result)))
            return
        start = self.starts.pop(rid, None)
        if start is None or start.done():
            return
        if "pid" in message:
            start.set_result(int(message["pid"]))
            return
        self.exits.pop(rid, None)  # nothing was forked for it
        if "retire" in message:
            self.retiring = True
            start.set_exception(
                _Retired(str(message["retire"]), preload=bool(message.get("preload")))
            )
        else:
            start.set_exception(ExecutorError(str(message.get("error"))))

    def _lost(self) -> None:
        """The control socket closed: the zygote is gone; so is whatever waited on it."""
        if not self.alive:
            return
        self.alive = False
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()
        why = f": {self.fatal}" if self.fatal else ""
        error = ExecutorError(f"the warm pool's zygote (pid {self.pid}) exited{why}")
        waiting: list[asyncio.Future[Any]] = [
            self.ready,
            *self.starts.values(),
            *self.exits.values(),
        ]
        self.starts.clear()
        self.exits.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: whoever awaits it still gets it

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Close the control socket (the zygote exits at its end-of-file) and reap it."""
        self._lost()
        try:
            async with asyncio.timeout(5.0):
                await self.proc.wait()
        except TimeoutError:
            self.kill()
            await self.proc.wait()

    # -- writing ----------------------------------------------------------------------

    async def request(
        self, rid: int, data: bytes, fds: Sequence[int]
    ) -> tuple[asyncio.Future[int], asyncio.Future[tuple[int, str | None]]]:
        """Send a request; its start (the pid) and its exit (the status, and the result
        file's text if the zygote read it) to await."""
        loop = asyncio.get_running_loop()
        start: asyncio.Future[int] = loop.create_future()
        exit_: asyncio.Future[tuple[int, str | None]] = loop.create_future()
        async with self.send_lock:
            if not self.alive:
                raise _Gone(f"the warm pool's zygote (pid {self.pid}) exited")
            self.starts[rid], self.exits[rid] = start, exit_
            try:
                sent = await self._send_fds(data, fds)
            except BaseException:
                self.starts.pop(rid, None)
                self.exits.pop(rid, None)
                raise
            if sent < len(data):
                # The rest goes without descriptors; a cancel halfway would leave the zygote
                # half a request: it is killed instead.
                try:
                    await loop.sock_sendall(self.sock, data[sent:])
                except BaseException:
                    self.kill()
                    raise
        return start, exit_

    def doom(self, pid: int) -> None:
        """Have the zygote SIGKILL ``pid``'s process group as soon as it reaped ``pid``.

        Best effort and without awaiting (it is part of a termination, which a cancel must
        not interrupt): skipped while a request is being sent, or if the socket is full.
        """
        if not self.alive or self.send_lock.locked():
            return
        data = json.dumps({"doom": pid}).encode() + b"\n"
        try:
            sent = self.sock.send(data)
        except OSError:  # full (the zygote is stuck), or gone
            return
        if sent < len(data):
            # Half a line would garble the next request: a zygote this far behind goes.
            self.fatal = "its control socket filled up"
            self.kill()

    async def _send_fds(self, data: bytes, fds: Sequence[int]) -> int:
        loop = asyncio.get_running_loop()
        while True:
            try:
                return socket.send_fds(self.sock, [data], list(fds))
            except (BlockingIOError, InterruptedError):
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self.sock.fileno(), _set_once, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock.fileno())
            except OSError as exc:
                # Gone (its end-of-file not read yet): nothing of the request was delivered.
                self._lost()
                raise _Gone(f"cannot reach the warm pool's zygote (pid {self.pid}): {exc}") from exc


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WarmChild:
    """A step run's process, forked by a zygote: its pid (and process group), its end."""

    def __init__(
        self, pid: int, exit_: asyncio.Future[tuple[int, str | None]], zygote: _Zygote
    ) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: What it wrote to its result file, once it ended, if its zygote read it (and
        #: removed the file): None if it left none, or a large one.
        self.result: str | None = None
        self._exit = exit_
        self._zygote = zygote

    async def wait(self) -> int:
        """Its exit status, once its zygote reaped it.

        Raises:
            ExecutorError: its zygote died first (its process group is killed).
        """
        try:
            code, self.result = await asyncio.shield(self._exit)
        except ExecutorError as exc:
            self._killpg(signal.SIGKILL)
            raise ExecutorError(
                f"{exc}; the step's process {self.pid} was killed with it"
            ) from None
        self.returncode = code
        return code

    def _killpg(self, signum: int) -> None:
        # The group id stays the step's as long as its lifeline's watcher lives, which is
        # until the executor writes the end byte or closes the lifeline.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def terminate(self, grace: float) -> None:
        """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
        if self.returncode is not None:
            return
        if not self._exit.done():
            self._zygote.doom(self.pid)
            self._killpg(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._exit)
            except TimeoutError:
                self._killpg(signal.SIGKILL)
                with contextlib.suppress(ExecutorError):
                    await asyncio.shield(self._exit)
            except ExecutorError:
                pass
        if self._exit.done() and self._exit.exception() is None:
            self.returncode = self._exit.result()[0]
        # Grandchildren may outlive the leader; the group id is still theirs.
        self._killpg(signal.SIGKILL)


class WarmPool:
    """Zygotes that fork step runs, for one executor.

    Args:
        python: the interpreter the zygotes run.
        sys_path: the import path they (and the steps) get.
        environ: the environment a zygote starts with (what the steps inherit, their own
            variables aside), read at each zygote's start.
        size: how many zygotes (each forks one step run at a time; the children run side
            by side).
    """

    def __init__(
        self,
        *,
        python: str,
        sys_path: Sequence[str],
        environ: Callable[[], Mapping[str, str]],
        aeventor_root: str,
        size: int = 1,
    ) -> None:
        if size < 1:
            raise ValueError(f"size={size!r}: at least 1")
        self.python = python
        self.sys_path = list(sys_path)
        self.environ = environ
        self.aeventor_root = aeventor_root
        self.size = size
        self._zygotes: list[_Zygote] = []
        self._starting: asyncio.Task[_Zygote] | None = None
        self._ids = itertools.count(1)
        #: Steps whose import started threads: their children import them.
        self._no_preload: set[tuple[str, str | None]] = set()

    def prestart(self) -> None:
        """Start a zygote now, in the background, unless one runs or is starting."""
        if self._starting is None and not self._live():
            self._begin_start()

    def _live(self) -> list[_Zygote]:
        return [z for z in self._zygotes if z.alive and not z.retiring]

    def _begin_start(self) -> asyncio.Task[_Zygote]:
        task = asyncio.create_task(self._start_zygote(), name="aeventor warm zygote start")
        self._starting = task

        def started(task: asyncio.Task[_Zygote]) -> None:
            if self._starting is task:
                self._starting = None
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                log.warning("warm.zygote_start_failed", error=str(exc))
            else:
                self._zygotes.append(task.result())

        task.add_done_callback(started)
        return task

    async def _start_zygote(self) -> _Zygote:
        ours, theirs = socket.socketpair()
        try:
            config = json.dumps({"sys_path": self.sys_path})
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-I",
                "-c",
                _zygote.BOOT,
                self.aeventor_root,
                str(theirs.fileno()),
                config,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                env=dict(self.environ()),
                start_new_session=True,
                pass_fds=[theirs.fileno()],
            )
        except OSError as exc:
            ours.close()
            raise ExecutorError(f"cannot start the warm pool ({self.python!r}): {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = _Zygote(proc, ours)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await zygote.ready
        except BaseException:
            zygote.kill()
            await zygote.close()
            raise
        log.debug("warm.zygote_started", pid=zygote.pid)
        return zygote

    async def _zygote(self) -> _Zygote:
        """The least busy live zygote; one is started if there is none (or too few)."""
        for zygote in [z for z in self._zygotes if z.retiring and z.alive and not z.load]:
            self._zygotes.remove(zygote)
            await zygote.close()
        self._zygotes = [z for z in self._zygotes if z.alive]
        live = self._live()
        if len(live) < self.size and self._starting is None:
            self._begin_start()
        if live:
            return min(live, key=lambda z: z.load)
        assert self._starting is not None
        return await asyncio.shield(self._starting)

    async def start(
        self,
        *,
        spec: Mapping[str, Any],
        env: Mapping[str, str],
        log_path: str,
        fds: Sequence[int],
        channel: bool,
        gate: bool,
        grace: float,
    ) -> WarmChild:
        """Fork the step run ``spec`` describes; return once its pid is known.

        Args:
            env: its whole environment (the channel's variable aside).
            log_path: its log file (an absolute path), which the zygote opens for appending.
            fds: its lifeline's read end, (``channel``) its channel, and (``gate``) the read
                end of its gate: a gated child waits, its session and lifeline set up, for
                one byte (:data:`._zygote.GATE_OPEN`) on it to run the step, and exits
                with :data:`._zygote.GATE_CLOSED` at end-of-file. The zygote gets copies:
                the caller closes these.
            grace: how long a cancelled start waits for the child to exist (to end it).

        Raises:
            ExecutorError: the zygote could not fork it, or died.
        """
        key = (str(spec["target"]), spec.get("main_path"))
        for _ in range(ATTEMPTS):
            zygote = await self._zygote()
            rid = next(self._ids)
            data = (
                json.dumps(
                    {
                        "id": rid,
                        "spec": spec,
                        "env": env,
                        "log": log_path,
                        "channel": channel,
                        "gate": gate,
                        "preload": key not in self._no_preload,
                        "preload_limit": PRELOAD_LIMIT,
                    }
                ).encode()
                + b"\n"
            )
            try:
                started, exited = await zygote.request(rid, data, fds)
            except _Gone:
                continue  # nothing was sent
            try:
                pid = await asyncio.shield(started)
            except _Retired as exc:
                if not exc.preload:
                    self._no_preload.add(key)
                log.warning("warm.zygote_retired", pid=zygote.pid, reason=str(exc))
                continue
            except asyncio.CancelledError:
                await self._abandon(zygote, started, exited, grace)
                raise
            return WarmChild(pid, exited, zygote)
        raise ExecutorError(
            f"step {spec['step']!r}: the warm pool's zygotes kept retiring or exiting"
        )

    async def _abandon(
        self,
        zygote: _Zygote,
        started: asyncio.Future[int],
        exited: asyncio.Future[tuple[int, str | None]],
        grace: float,
    ) -> None:
        """A cancelled start: the zygote forks the child anyway; end it once it exists.

        A zygote that does not answer within ``grace`` (stuck importing the step's module)
        is killed.
        """
        try:
            async with asyncio.timeout(grace):
                pid = await asyncio.shield(started)
        except TimeoutError:
            zygote.kill()
            return
        except (ExecutorError, _Retired):
            return
        await WarmChild(pid, exited, zygote).terminate(grace)

    async def aclose(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            await asyncio.wait([starting])
            if not starting.cancelled() and starting.exception() is None:
                self._zygotes.append(starting.result())
        zygotes, self._zygotes = self._zygotes, []
        for zygote in zygotes:
            await zygote.close()
