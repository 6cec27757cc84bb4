"""A step's lifeline: its process group is terminated when the worker that started it dies.

The worker (the process that runs the engine, or an agent) starts each step process with
the read end of a pipe of its own, the *lifeline*; only the worker holds the write end
(``os.pipe`` makes both ends close-on-exec, and the step gets the read end through
``pass_fds``, so no other step inherits either end). However the worker dies, SIGKILL
included, the kernel closes the write end, and the read end sees end-of-file.

The step's leader (the process that leads its process group: the function runner, or the
command through this module's ``__main__``) calls :func:`hold` first. It forks a *watcher*,
a second process in the same group that blocks on the read end:

* a local worker writes :data:`ENDED` once it has reaped the step's leader, then closes its
  end: the watcher exits; what the step left running keeps running, as it did before
  lifelines existed.
* end-of-file without :data:`ENDED`: the worker is gone. The watcher sends SIGTERM to the
  group, waits up to :data:`GRACE` seconds for the rest of the group to exit, then SIGKILLs
  the group, itself included. Grandchildren are reached as long as they stay in the group.

Over SSH the lifeline is the channel's stdin, which sshd closes as the step ends, before
the agent could write anything: there, end-of-file terminates the group only if its leader
still exists (``ended_by_byte=False``). That test races anything that kills the leader at
the moment the agent dies (its grandchildren would then be left), which is why a local
worker uses the end byte: with it, the Linux ``PR_SET_PDEATHSIG`` below (which kills the
leader at once) could not make the watcher spare the group.

Why a process and not a thread of the runner: a thread dies with the runner at the group's
SIGTERM and could not send the SIGKILL that follows (nor watch a command, which is not
Python). Why double-forked: the watcher must not be a child of the leader, which, once it
``exec``-s a command, could reap it by surprise (``wait``/``os.wait()``) or wait for it.
Orphaned, it is reaped by init (or the nearest subreaper). Under a worker that is itself
PID 1 of a container, orphans are its to reap: run such containers with an init
(``docker run --init``). The group id cannot be reused while the watcher is in it, so
"the leader still exists" is ``kill(pgid, 0)`` (a zombie counts as existing).

The watcher ignores SIGTERM (a step that signals its own group, ``kill 0``, does not
lose its lifeline); a cancel by the worker still ends it with the SIGKILL it sends the
group after the grace period.

Belt and braces, on Linux, with the end byte only: the function runner also asks for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``, kept across ``exec``). That covers a write end leaked into a process
the worker forked without ``exec``. It fires when the *thread* that spawned the step exits,
so steps must be spawned from a thread that lives as long as they run: the event loop's
(``asyncio.create_subprocess_exec`` forks there). SIGTERM, not SIGKILL, so a step still
gets the same grace as from the watcher. The command supervisor does not: loading ctypes
costs 2-10 ms here, a fifth of its whole start, for a case the lifeline mostly covers.

Run as the supervisor of a command step (``python -I -S -c`` :data:`SUPERVISOR` ``LIFELINE_FD
ERR_FD ARGV...``; ``-c`` rather than this file's path, so the module comes from its cached
bytecode instead of being compiled at every start), it it calls :func:`hold`, then ``exec``-s the command, which
therefore keeps the pid the worker spawned (the pid the store records, and ``$$`` of a shell
step), its exit status and its signals, unchanged. Should ``exec`` fail, it writes
``errno`` to ``ERR_FD`` (close-on-exec, so it reads end-of-file at a successful ``exec``)
and exits with 127; the worker raises what ``subprocess`` would have raised.

Standard library only, and nothing imported that the interpreter does not load anyway
(ctypes only on Linux): it runs with ``-I -S`` and must start fast.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time

#: Seconds the rest of a step's group gets between SIGTERM and SIGKILL once its worker died.
GRACE = 1.0
#: How often the watcher looks whether the group has emptied during the grace period.
POLL = 0.05
#: What a local worker writes to a lifeline once it has reaped the step's leader.
ENDED = b"\0"
#: The exit status of the supervisor when the command cannot be executed.
EXEC_FAILED = 127

_PR_SET_PDEATHSIG = 1


def hold(fd: int, *, ended_by_byte: bool, reap: bool = True) -> int:
    """Tie the calling process's group to the lifeline ``fd``; close ``fd`` here.

    Call it in the group's leader, single-threaded, before starting anything else.

    Args:
        ended_by_byte: the worker writes :data:`ENDED` once it has reaped the leader (a
            local worker): end-of-file without it always terminates the group, and the
            leader also asks for SIGTERM when its parent dies (Linux). If false (over
            SSH, where the channel closes as the step ends), end-of-file terminates the
            group only if the leader still exists.
        reap: wait for the intermediate process of the double fork (it exits at once).
            If false (a warm step, whose start this wait would lengthen by a scheduling
            round trip), the caller may reap it later; unreaped, it stays a zombie child
            of the leader until the leader exits.

    Returns:
        The pid of the intermediate process.
    """
    if ended_by_byte:
        _parent_death_signal(signal.SIGTERM)
    pgid = os.getpgrp()
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                _watch(fd, pgid, ended_by_byte)
        finally:
            os._exit(0)
    os.close(fd)
    if reap:
        os.waitpid(pid, 0)
    return pid


def _parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):  # no libc to load, or no prctl in it
        pass


def _watch(fd: int, pgid: int, ended_by_byte: bool) -> None:
    """The watcher's whole life: block on ``fd``, then terminate the group if need be."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    # Hold none of the step's descriptors: a pipe (the step's stdin, an SSH channel) must
    # close when the step closes it. Only a log *file* is kept, to say what happened.
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    try:
        keep_stderr = stat.S_ISREG(os.fstat(2).st_mode)
    except OSError:
        keep_stderr = False
    if not keep_stderr:
        os.dup2(devnull, 2)
    os.closerange(3, fd)
    os.closerange(fd + 1, _max_fd())
    try:
        data = os.read(fd, 1)
    except OSError:
        data = b""
    if data if ended_by_byte else not _exists(pgid):
        os._exit(0)
    if keep_stderr:
        msg = (
            f"aeventor: the worker that started this step is gone; terminating process "
            f"group {pgid}\n"
        )
        try:
            os.write(2, msg.encode())
        except OSError:
            pass
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and _others_in_group(pgid):
        time.sleep(POLL)
    _killpg(pgid, signal.SIGKILL)  # the watcher too
    os._exit(0)


def _max_fd() -> int:
    try:
        return max(int(os.sysconf("SC_OPEN_MAX")), 256)
    except (OSError, ValueError):
        return 1024


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _others_in_group(pgid: int) -> bool:
    """Whether a live process other than this one is in group ``pgid``.

    Read from /proc where there is one; elsewhere, assume so (the full grace is waited).
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rindex(b")") + 2 :].split()
        # state, ppid, pgrp
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            return True
    return False


def supervise(argv: list[str]) -> None:
    """``LIFELINE_FD ERR_FD COMMAND...``: hold the lifeline, then become the command."""
    fd, err, command = int(argv[0]), int(argv[1]), argv[2:]
    os.set_inheritable(err, False)
    hold(fd, ended_by_byte=True)
    # What subprocess does for its children (restore_signals): the interpreter ignores
    # these, and an ignored signal stays ignored across exec.
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        try:
            os.write(err, str(exc.errno or 0).encode())
        finally:
            os._exit(EXEC_FAILED)


#: The ``-c`` program of ``python -I -S -c SUPERVISOR LIFELINE_FD ERR_FD ARGV...``.
SUPERVISOR = (
    # A module's __file__ is absolute (Python 3.9+): no lookup of the working directory.
    f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
    "import _lifeline; _lifeline.supervise(sys.argv[1:])"
)
