"""The warm pool's zygote: a plain, single-threaded process that forks one child per step run.

:class:`~aeventor.backends.executors.local.LocalExecutor` starts it (see :mod:`._warm`) as
``python -I -c`` :data:`BOOT` ``AEVENTOR_ROOT CONTROL_FD CONFIG``, in a session of its own,
with the executor's import path and the environment its steps inherit (their own variables
aside). It imports the step runner, then serves its *control socket* (a Unix socket pair
with the executor), one JSON line each way:

* ``{"id": N, "spec": ..., "env": ..., "log": PATH, "channel": bool, "gate": bool,
  "preload": bool, "preload_limit": SECONDS}``
  with the descriptors ``[lifeline]`` (then the step's channel, then its gate, as flagged)
  attached (``SCM_RIGHTS``). The zygote opens the step's log (``PATH``, for appending),
  imports the step's callable, once per zygote (``preload``; with the step's environment
  set while it imports, and what the import prints copied to the step's log), forks,
  answers ``{"id": N, "pid": PID}``, and closes its copies of the descriptors. Should the
  import fail, the child imports it again and fails as a fresh process would (the same
  error in the same log). A *gated* child sets up its session, descriptors, environment
  and lifeline, then waits for :data:`GATE_OPEN` on its gate before it runs the step; at
  end-of-file it exits with :data:`GATE_CLOSED` having run nothing of it (the executor
  holds the step back until the worker recorded its start: see
  :attr:`aeventor.dispatch.executor.StepLaunch.fence`).
* ``{"doom": PID}``: the executor is terminating that child; once it is reaped, the zygote
  SIGKILLs the rest of its process group before it reports the end (the executor does too,
  a moment later).
* ``{"id": N, "exit": CODE, "result": TEXT}`` once it reaped the child (``CODE`` as
  :attr:`subprocess.Popen.returncode`: negative for a signal). ``TEXT`` is the child's
  outcome: a small one it wrote to its *result pipe* (made by the zygote at each fork;
  a file's creation costs more than the rest of a short step's end), else what it wrote to
  its result file (``spec["result_path"]``), which the zygote then removed; it is left out
  when there is neither, or a file larger than :data:`RESULT_INLINE` (the executor reads
  that one itself). Reading it here saves the executor a trip through a thread per step.
* ``{"id": N, "retire": REASON, "preload": bool}``, without forking: the import left
  threads running (forking a threaded process may deadlock the child; ``preload`` false:
  never preload this step again), or took longer than ``preload_limit`` (it would hold up
  every other warm step; never preload it again either), or a module it preloaded changed
  on disk. The zygote
  answers every later request so too, but still reaps and reports the children it forked;
  the executor asks a new zygote, and closes this one once its last child ended.

The child is what a fresh step runner would be: it leads a session of its own (``setsid``),
its stdout and stderr are the log file, its stdin ``/dev/null``, its environment exactly the
step's (``os.environ`` cleared, then set), its
lifeline held (:func:`._lifeline.hold`, which also asks for SIGTERM should the zygote die),
and it writes its result file and exits through :func:`.runner.run_spec`. It never returns
into the zygote's loop.

The zygote exits when its control socket closes (the executor closed it, or died) and, on
Linux, as soon as the thread that started it exits (``PR_SET_PDEATHSIG``, SIGKILL).

Fork safety: nothing here starts a thread or an event loop. A step module that starts
threads at import time is detected after the import (``/proc/self/task``, else
:func:`threading.active_count`) and never preloaded again; anything else a module sets up at
import time (open files, sockets, connections) is shared by every child forked afterwards.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import traceback
from typing import IO, Any, NoReturn

from . import _lifeline, runner

#: Most descriptors one request carries: lifeline, channel, gate.
MAX_FDS = 3
#: The largest result file the zygote reads and sends with a child's end (a larger one is
#: left for the executor to read).
RESULT_INLINE = 1 << 16
#: The variable that names a local process step's channel (as aeventor.context.CHANNEL_ENV,
#: not imported: the zygote stays lean).
CHANNEL_ENV = "EVENTOR_CHANNEL_FD"

#: What the executor writes to a gated child's gate to have it run its step.
GATE_OPEN = b"\1"
#: The exit status of a gated child told not to run its step.
GATE_CLOSED = 75

_PR_SET_PDEATHSIG = 1
#: inspect.CO_COROUTINE
_CO_COROUTINE = 0x80


class _Loaded:
    """A step callable the zygote preloaded, and what tells whether it is still current."""

    __slots__ = ("func", "main_module", "path", "stamp")

    def __init__(self, func: Any, main_module: Any, path: str | None) -> None:
        self.func = func
        self.main_module = main_module
        self.path = path
        self.stamp = _stamp(path)


def _stamp(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


#: What :meth:`Zygote._preload` returns when the import left threads running.
_THREADED = _Loaded(None, None, None)


#: What :meth:`Zygote._preload` returns when the import took longer than its limit.
_SLOW = _Loaded(None, None, None)


class _PreloadTimeout(BaseException):
    """Raised into an import that outlived its limit (a BaseException: a module's
    ``except Exception`` does not swallow it)."""


def _too_slow(signum: int, frame: object) -> None:
    raise _PreloadTimeout


def _threads() -> int:
    """How many threads this process runs."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        threading = sys.modules.get("threading")
        return 1 if threading is None else int(threading.active_count())


class Zygote:
    """The zygote's whole life: :meth:`serve` until its control socket closes."""

    def __init__(self, sock: socket.socket, sys_path: list[str]) -> None:
        self.sock = sock
        self.sys_path = sys_path
        self.buffer = b""
        self.fds: list[int] = []  # received, not yet claimed by a request
        # pid -> request id, result file, read end of its result pipe
        self.children: dict[int, tuple[int, str, int]] = {}
        self.loaded: dict[tuple[str, str | None], _Loaded] = {}
        self.environ = dict(os.environ)
        self.retired: tuple[str, bool] | None = None
        self.doomed: set[int] = set()  # children being terminated
        self.wake_r, self.wake_w = os.pipe()

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> NoReturn:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, _ignore)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._send({"ready": os.getpid(), "threads": _threads()})
        while True:
            readable, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [])
            # Requests first: a "doom" sent before its child was signalled is then known
            # when the child is reaped.
            if self.sock.fileno() in readable:
                self._receive()
            if self.wake_r in readable:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                self._reap()

    def _receive(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, 1 << 16, MAX_FDS * 8)
        except ConnectionError:
            data, fds, flags = b"", [], 0
        for fd in fds:
            os.set_inheritable(fd, False)
        self.fds.extend(fds)
        if not data:
            os._exit(0)  # the executor is gone (or closed us): so are we
        if flags & socket.MSG_CTRUNC:
            self._fatal("descriptors were lost in transit (MSG_CTRUNC)")
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            request = json.loads(line)
            if "doom" in request:
                self.doomed.add(int(request["doom"]))
                continue
            count = 1 + bool(request.get("channel")) + bool(request.get("gate"))
            if len(self.fds) < count:
                self._fatal(f"request {request.get('id')} came without its descriptors")
            mine, self.fds = self.fds[:count], self.fds[count:]
            try:
                self._run(request, mine)
            finally:
                for fd in mine:
                    _close(fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.doomed:
                # Being terminated: the rest of its group (its lifeline's watcher, which
                # ignores SIGTERM, and what it started) goes at once, as the executor would
                # have it go once told of this end.
                self.doomed.discard(pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            child = self.children.pop(pid, None)
            if child is not None:
                rid, result_path, result_r = child
                message: dict[str, Any] = {"id": rid, "exit": os.waitstatus_to_exitcode(status)}
                result = _read_result_pipe(result_r)
                if result is None:
                    result = _take_result(result_path)
                if result is not None:
                    message["result"] = result
                self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            os._exit(0)  # the executor is gone

    def _fatal(self, reason: str) -> NoReturn:
        self._send({"fatal": reason})
        os._exit(70)

    # -- one step run -------------------------------------------------------------------

    def _run(self, request: dict[str, Any], fds: list[int]) -> None:
        rid = request["id"]
        if self.retired is not None:
            self._send({"id": rid, "retire": self.retired[0], "preload": self.retired[1]})
            return
        # The log is opened here rather than by the executor: blocking is fine in this
        # process, and the executor saves a round trip through a thread per step.
        try:
            log_fd = _open_log(request["log"])
        except OSError as exc:
            self._send({"id": rid, "error": f"cannot open the step's log: {exc}"})
            return
        try:
            self._fork(request, [log_fd, *fds])
        finally:
            _close(log_fd)

    def _fork(self, request: dict[str, Any], fds: list[int]) -> None:
        rid, spec = request["id"], request["spec"]
        loaded = None
        if request.get("preload"):
            key = (spec["target"], spec.get("main_path"))
            loaded = self.loaded.get(key)
            if loaded is not None and _stamp(loaded.path) != loaded.stamp:
                self._retire(rid, f"{loaded.path} changed on disk since it was imported", True)
                return
            if loaded is None:
                loaded = self._preload(request, fds[0])
                if loaded is _SLOW:
                    self._retire(
                        rid,
                        f"importing {spec['target']} took longer than "
                        f"{request.get('preload_limit')}s; it is imported in each step's "
                        "process instead",
                        False,
                    )
                    return
                if loaded is _THREADED:
                    self._retire(
                        rid,
                        f"importing {spec['target']} started threads; it is imported in each "
                        "step's process instead",
                        False,
                    )
                    return
                if loaded is not None:
                    self.loaded[key] = loaded
        # Objects of the zygote go to the permanent generation: a collection in the child
        # does not touch (and so copy) their pages.
        gc.freeze()
        try:
            result_r, result_w = os.pipe()
        except OSError as exc:
            self._send({"id": rid, "error": f"cannot make a pipe: {exc}"})
            return
        try:
            pid = os.fork()
        except OSError as exc:
            _close(result_r)
            _close(result_w)
            self._send({"id": rid, "error": f"cannot fork: {exc}"})
            return
        if pid == 0:
            self._child(request, fds, loaded, result_r, result_w)
        _close(result_w)
        os.set_blocking(result_r, False)
        self.children[pid] = (rid, spec["result_path"], result_r)
        self._send({"id": rid, "pid": pid})

    def _retire(self, rid: int, reason: str, preload: bool) -> None:
        """Fork no more: answer this request and every later one with ``retire``, and keep
        reaping (and reporting) the children forked so far, until the executor closes us."""
        self.retired = (reason, preload)
        self._send({"id": rid, "retire": reason, "preload": preload})

    def _preload(self, request: dict[str, Any], log_fd: int) -> _Loaded | None:
        """Import the step's callable here, as its own process would; None if that fails
        (the child then imports it, and reports what goes wrong as a fresh process does).

        While it imports, ``os.environ`` is the step's, ``sys.argv`` the script's, and what
        it prints goes to a temporary file, copied to the step's log if the import works.
        """
        spec = request["spec"]
        main_path = spec.get("main_path")
        modules, path, argv = set(sys.modules), list(sys.path), list(sys.argv)
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        saved = (os.dup(1), os.dup(2))
        ok = slow = False
        limit = float(request.get("preload_limit") or 0)
        previous = signal.signal(signal.SIGALRM, _too_slow)
        with _scratch_file() as out:
            try:
                # An import that hangs would hold up every other warm step: it is stopped
                # after ``preload_limit`` seconds and left to the step's own process.
                signal.setitimer(signal.ITIMER_REAL, limit)
                _set_environ(request["env"])
                if main_path and spec.get("argv"):
                    sys.argv = list(spec["argv"])
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                # What the import logs is formatted as in the step's process.
                runner._setup_logging(
                    bool(spec.get("deterministic_logs")),
                    int(spec.get("log_level", logging.INFO)),
                )
                func = runner._load(spec["target"], main_path, spec["step"])
                ok = True
            except _PreloadTimeout:
                slow = True
            except BaseException:  # noqa: BLE001, S110 - the child fails with it instead
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                _flush()
                for handler in root.handlers[len(handlers) :]:
                    handler.flush()
                root.handlers[:] = handlers
                root.setLevel(level)
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                _set_environ(self.environ)
                sys.argv = argv
                sys.path[:] = path
            if slow:
                return _SLOW  # the zygote retires: what the import left does not matter
            if not ok:
                for name in set(sys.modules) - modules:
                    del sys.modules[name]
                return None
            if _threads() > 1:
                # Retired without forking: the step is asked again, and its output with it.
                return _THREADED
            out.seek(0)
            try:
                while chunk := out.read(1 << 16):
                    os.write(log_fd, chunk)
            except OSError:
                pass  # a full disk loses the import's output, not the zygote
        if _is_async(func):
            import asyncio  # noqa: F401 - once here, not in each child (asyncio.run)
        if main_path:
            return _Loaded(func, sys.modules.get(runner.MAIN_MODULE), main_path)
        module = sys.modules.get(spec["target"].partition(":")[0])
        return _Loaded(func, None, getattr(module, "__file__", None))

    def _child(
        self,
        request: dict[str, Any],
        fds: list[int],
        loaded: _Loaded | None,
        result_r: int,
        result_w: int,
    ) -> NoReturn:
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            siblings = [read_end for _, _, read_end in self.children.values()]
            for fd in (self.wake_r, self.wake_w, result_r, *self.fds, *siblings):
                _close(fd)
            self.sock.close()
            log_fd, lifeline, *rest = fds
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            env = dict(request["env"])
            if request.get("channel"):
                channel = rest.pop(0)
                os.set_inheritable(channel, True)
                env[CHANNEL_ENV] = str(channel)
            gate = rest.pop(0) if request.get("gate") else None
            _set_environ(env)
            # Not waiting for the double fork's intermediate process saves a scheduling
            # round trip; it is reaped once the step's function returned.
            intermediate = _lifeline.hold(lifeline, ended_by_byte=True, reap=False)
            spec = request["spec"]
            func = None
            if loaded is not None:
                func = loaded.func
                if spec.get("main_path"):
                    script_dir = os.path.dirname(os.path.abspath(spec["main_path"]))
                    if script_dir not in sys.path:
                        sys.path.insert(0, script_dir)
                    if loaded.main_module is not None:
                        sys.modules[runner.MAIN_MODULE] = loaded.main_module
            runner.prepare(spec)
            if gate is not None and not _pass_gate(gate):
                # Not ours to run (its claim was taken, or its start not recorded): nothing
                # of the step ran; the executor knows why.
                code = GATE_CLOSED
            else:
                code = runner.run_prepared(spec, func, result_fd=result_w)
            try:
                os.waitpid(intermediate, os.WNOHANG)
            except ChildProcessError:  # the step reaped it (os.wait())
                pass
        except BaseException:  # noqa: BLE001 - the child must never return into the loop
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001, S110
                pass
        finally:
            # As at an interpreter's exit: atexit functions (logging's flush among them),
            # then the standard streams.
            try:
                atexit._run_exitfuncs()
            except BaseException:  # noqa: BLE001, S110
                pass
            _flush()
            os._exit(code)


def _pass_gate(gate: int) -> bool:
    """Wait for the executor's word: :data:`GATE_OPEN` to run the step, end-of-file not to."""
    try:
        word = os.read(gate, 1)
    except OSError:
        word = b""
    finally:
        _close(gate)
    return word == GATE_OPEN


def _open_log(path: str) -> int:
    """The step's log, opened for appending (its directory made), close-on-exec."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _read_result_pipe(fd: int) -> str | None:
    """What an ended child wrote to its result pipe (one write of at most
    :data:`.runner.PIPE_RESULT_MAX` bytes: all there once it exited), or None; closes ``fd``."""
    try:
        data = os.read(fd, runner.PIPE_RESULT_MAX + 1)
    except OSError:  # empty (BlockingIOError: a grandchild still holds the write end)
        data = b""
    finally:
        _close(fd)
    if not data or len(data) > runner.PIPE_RESULT_MAX:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _take_result(path: str) -> str | None:
    """The result file a child wrote, removed, if it is there, small and UTF-8; otherwise
    None and the file left for the executor to read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(RESULT_INLINE + 1)
    except OSError:
        return None
    if len(data) > RESULT_INLINE:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    try:
        os.unlink(path)
    except OSError:
        return None
    return text


def _is_async(func: Any) -> bool:
    """Whether ``func`` is an ``async def`` (as inspect.iscoroutinefunction(inspect.unwrap()),
    without importing inspect: 5 ms of the zygote's start)."""
    while hasattr(func, "__wrapped__"):
        func = func.__wrapped__
    code = getattr(func, "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


def _scratch_file() -> IO[bytes]:
    """An anonymous file (memfd on Linux: no tempfile import, ~8 ms of the zygote's start)."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create("aeventor-preload", os.MFD_CLOEXEC), "w+b")
    import tempfile

    return tempfile.TemporaryFile()


def _ignore(signum: int, frame: object) -> None:
    """SIGCHLD's handler: only there so that the signal wakes the loop (set_wakeup_fd)."""


def _set_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``env``. Only what differs is changed (each change is an
    unsetenv or putenv): a step's environment is mostly the zygote's own."""
    environ = os.environ
    for key in [key for key in environ if key not in env]:
        del environ[key]
    for key, value in env.items():
        if environ.get(key) != value:
            environ[key] = value


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main() -> int:
    """``CONTROL_FD CONFIG_JSON``: serve the control socket until it closes."""
    control, config = int(sys.argv[1]), json.loads(sys.argv[2])
    _parent_death_signal(signal.SIGKILL)
    sys_path = list(config.get("sys_path", []))
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    # What every child needs, imported once: ctypes for the lifeline's parent-death signal.
    # (asyncio is imported with the first async function a zygote preloads.)
    import ctypes  # noqa: F401

    sock = socket.socket(fileno=control)
    sock.setblocking(True)
    try:
        Zygote(sock, sys_path).serve()
    except BaseException:  # noqa: BLE001 - tell the executor, then go
        try:
            sock.sendall(json.dumps({"fatal": traceback.format_exc()}).encode() + b"\n")
        finally:
            os._exit(70)


#: The ``-c`` program of ``python -I -c BOOT AEVENTOR_ROOT CONTROL_FD CONFIG``.
BOOT = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from aeventor.backends.executors._zygote import main; sys.exit(main())"
)
