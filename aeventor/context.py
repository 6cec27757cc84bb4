"""The context a running step sees: who it is, its environment, and (in-loop) how to fire
events.

What a step's process inherits from the process that starts it is decided here, once, for
every executor (:class:`EnvPolicy`, :func:`process_env`):

- the steps of a standalone run (``Eventor`` in the user's own process) inherit that
  process's environment, except aeventor's secrets (:data:`SECRET_ENV`: the cluster key and
  the key of the encrypted store passwords, and the files they are read from);
- the local steps of an agent inherit only :data:`DEFAULT_PASS_ENV` of the agent's
  variables, plus those the operator names (``aeventor agent --pass-env PATTERN``), never a
  secret: not the cluster key, not the store's URL or password, nothing else of the agent's;
- a step on an SSH host starts with the login environment that host's sshd gives it; of the
  agent's variables it is sent only those named by ``--pass-env`` (the agent's ``PATH`` or
  ``HOME`` mean nothing there).

On top of what it inherits, every step gets its group's and its own ``env=`` variables and
the ``EVENTOR_*`` ones (:func:`launch_env`).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .exceptions import AeventorError

if TYPE_CHECKING:
    from .program.model import StepDef

__all__ = (
    "DEFAULT_PASS_ENV",
    "SECRET_ENV",
    "EnvPolicy",
    "StepContext",
    "bind_step",
    "current_step",
    "launch_env",
    "process_env",
    "step_env",
)

#: The agent's variables its local steps inherit without being told: what a program needs to
#: find commands, its home, its user, its locale, time zone, temporary directory and terminal.
DEFAULT_PASS_ENV: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TERM",
)

#: aeventor's secrets, never inherited by a step whatever a pattern says: the cluster key
#: (which signs work for every agent) and the key of the stores' encrypted passwords, and the
#: variables naming the files they are read from.
SECRET_ENV: frozenset[str] = frozenset(
    {"AEVENTOR_CLUSTER_KEY", "AEVENTOR_CLUSTER_KEY_FILE", "AEVENTOR_KEY", "AEVENTOR_KEY_FILE"}
)


def _matcher(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One compiled regular expression for case-sensitive fnmatch ``patterns``."""
    translated = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{t})" for t in translated)) if translated else None


@dataclass(frozen=True, slots=True)
class EnvPolicy:
    """Which of the starting process's environment variables its steps inherit.

    Args:
        local: fnmatch patterns (case-sensitive) of the variables a local step inherits;
            None: all of them (a standalone run).
        remote: those sent to a step on an SSH host, whose sshd gives it a login
            environment of its own.

    :data:`SECRET_ENV` is never inherited. The default is a standalone run's policy;
    :meth:`agent` makes an agent's.

    .. versionadded:: 0.1
    """

    local: tuple[str, ...] | None = None
    remote: tuple[str, ...] = ()
    _local: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _remote: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_local", None if self.local is None else _matcher(self.local))
        object.__setattr__(self, "_remote", _matcher(self.remote))

    @classmethod
    def agent(cls, pass_env: Iterable[str] = ()) -> EnvPolicy:
        """An agent's: :data:`DEFAULT_PASS_ENV` and ``pass_env`` locally, ``pass_env`` alone
        to SSH hosts."""
        extra = tuple(pass_env)
        return cls(local=(*DEFAULT_PASS_ENV, *extra), remote=extra)

    def inherited(self, environ: Mapping[str, str], *, remote: bool = False) -> dict[str, str]:
        """The variables of ``environ`` a step inherits (locally, or on an SSH host)."""
        if remote:
            matcher = self._remote
            if matcher is None:
                return {}
        elif self.local is None:
            return {k: v for k, v in environ.items() if k not in SECRET_ENV}
        else:
            matcher = self._local
            if matcher is None:
                return {}
        return {k: v for k, v in environ.items() if k not in SECRET_ENV and matcher.fullmatch(k)}


def process_env(
    env: Mapping[str, str],
    policy: EnvPolicy,
    *,
    remote: bool = False,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a step's process: what it inherits, then its own ``env``.

    Args:
        env: the step run's own variables (:func:`launch_env`); they win.
        policy: what it inherits of ``environ``.
        remote: for a step on an SSH host: what is sent there (on top of the login
            environment sshd gives it).
        environ: the starting process's environment (default :data:`os.environ`).
    """
    source = os.environ if environ is None else environ
    return {**policy.inherited(source, remote=remote), **env}


@dataclass(frozen=True, slots=True)
class StepContext:
    """Identity of the step run being executed, and its environment.

    Subprocess steps see the same values as ``EVENTOR_*`` environment variables; in-loop
    steps share the engine's process, so they read them here (``os.environ`` is never
    written, which keeps concurrent steps apart).

    .. versionadded:: 0.1
    """

    run_id: str
    program: str
    step: str
    sequence: str
    recovery: int
    attempt: int
    env: Mapping[str, str]
    _trigger: Callable[[str, str], Awaitable[None]]

    async def trigger(self, event: object, sequence: str | int | None = None) -> None:
        """Fire ``event`` in this run, for ``sequence`` (default: this step's sequence).

        Firing the same event for the same sequence twice does nothing the second time.
        """
        name = getattr(event, "name", event)
        if not isinstance(name, str):
            raise AeventorError(f"trigger() takes an event or an event name, not {event!r}")
        await self._trigger(name, self.sequence if sequence is None else str(sequence))


_current: contextvars.ContextVar[StepContext] = contextvars.ContextVar("aeventor_step")


#: The variable that names a local process step's channel to its worker (a socket
#: descriptor it inherits).
CHANNEL_ENV = "EVENTOR_CHANNEL_FD"
#: The variable that names the channel of a process step on an SSH host: the path of a
#: Unix socket on that host, which SSH forwards to the step's worker.
CHANNEL_PATH_ENV = "EVENTOR_CHANNEL_PATH"


def current_step() -> StepContext:
    """The :class:`StepContext` of the step running in this task: an in-loop step, or the
    function of a process step, local or on an SSH host (in its own process, where
    ``trigger`` sends the event to the step's worker over the step's channel and returns
    once it is fired; call it, or await it in an async function).

    Raises:
        AeventorError: when called outside a step (or in a command step, which reads the
            ``EVENTOR_*`` variables instead).

    .. versionadded:: 0.1
    .. versionchanged:: 0.1
        In the function of a process step on an SSH host.
    """
    try:
        return _current.get()
    except LookupError:
        pass
    global _process_step
    if _process_step is None and (CHANNEL_ENV in os.environ or CHANNEL_PATH_ENV in os.environ):
        _process_step = _ChannelStep.from_environ(os.environ)
    if _process_step is not None:
        return _process_step
    raise AeventorError(
        "current_step() is only available inside a step: an in-loop (async def) step, or "
        "the function of a process step (local, or on an SSH host whose sshd allows "
        "stream-local forwarding); command steps read the EVENTOR_* environment variables "
        "instead"
    )


class _Fired:
    """What a process step's ``trigger`` returns: the event is already fired; awaiting this
    (in an async step function) returns at once."""

    def __await__(self) -> Iterator[None]:
        return iter(())


@dataclass(frozen=True, slots=True)
class _ChannelStep(StepContext):
    """The context of a process step: its identity from its environment, its events sent to
    its worker over the channel (one JSON line each way)."""

    channel: object = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> _ChannelStep:
        """The step's context, its channel open: the socket it inherited (a local step), or
        a connection to the Unix socket its host forwards to the worker (an SSH step)."""
        import socket

        if CHANNEL_ENV in environ:
            sock = socket.socket(fileno=int(environ[CHANNEL_ENV]))
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(environ[CHANNEL_PATH_ENV])
            except OSError as exc:
                sock.close()
                raise AeventorError(
                    f"current_step(): cannot reach the step's worker through its channel "
                    f"{environ[CHANNEL_PATH_ENV]!r}: {exc}"
                ) from exc
        return cls(
            run_id=environ.get("EVENTOR_RUN_ID", ""),
            program=environ.get("EVENTOR_PROGRAM", ""),
            step=environ.get("EVENTOR_STEP_NAME", ""),
            sequence=environ.get("EVENTOR_STEP_SEQUENCE", ""),
            recovery=int(environ.get("EVENTOR_STEP_RECOVERY", "0") or 0),
            attempt=int(environ.get("EVENTOR_STEP_ATTEMPT", "1") or 1),
            env=dict(environ),
            _trigger=_no_loop_trigger,
            channel=sock.makefile("rwb"),
        )

    def trigger(  # type: ignore[override]  # blocking here: the step's own process
        self, event: object, sequence: str | int | None = None
    ) -> _Fired:
        """Fire ``event`` in this run, for ``sequence`` (default: this step's sequence);
        returns once the worker recorded it. Raises :class:`AeventorError` with the
        worker's answer when it could not (an undefined event, a run that ended)."""
        import json

        name = getattr(event, "name", event)
        if not isinstance(name, str):
            raise AeventorError(f"trigger() takes an event or an event name, not {event!r}")
        seq = self.sequence if sequence is None else str(sequence)
        channel: Any = self.channel
        channel.write(json.dumps({"event": name, "sequence": seq}).encode() + b"\n")
        channel.flush()
        line = channel.readline()
        if not line:
            raise AeventorError(f"trigger({name!r}): the step's worker closed its channel")
        reply = json.loads(line)
        if "error" in reply:
            raise AeventorError(f"trigger({name!r}): {reply['error']}")
        return _Fired()


async def _no_loop_trigger(event: str, sequence: str) -> None:  # pragma: no cover
    raise AeventorError("a process step's context fires events through its channel")


_process_step: _ChannelStep | None = None


@contextlib.contextmanager
def bind_step(context: StepContext) -> Iterator[StepContext]:
    """Make ``context`` what :func:`current_step` returns in this task, for the block.

    Used by the executor around an in-loop step; the previous value is restored on exit.
    """
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def step_env(
    *,
    run_id: str,
    program: str,
    step: str,
    sequence: str,
    recovery: int,
    attempt: int,
    logger_name: str,
) -> dict[str, str]:
    """The ``EVENTOR_*`` variables of one step run."""
    return {
        "EVENTOR_RUN_ID": run_id,
        "EVENTOR_PROGRAM": program,
        "EVENTOR_STEP_NAME": step,
        "EVENTOR_STEP_SEQUENCE": sequence,
        "EVENTOR_STEP_RECOVERY": str(recovery),
        "EVENTOR_STEP_ATTEMPT": str(attempt),
        "EVENTOR_LOGGER_NAME": logger_name,
    }


class _ClaimLike(Protocol):
    @property
    def run_id(self) -> str: ...
    @property
    def step(self) -> str: ...
    @property
    def sequence(self) -> str: ...
    @property
    def recovery(self) -> int: ...
    @property
    def attempt(self) -> int: ...


def launch_env(
    claim: _ClaimLike, step: StepDef, *, program: str, logger_name: str
) -> dict[str, str]:
    """Everything a step run sees in its environment: its group's and its own variables,
    then the ``EVENTOR_*`` ones (which win), and ``EVENTOR_HOST``, its assigned host."""
    return {
        **step.env,
        **step_env(
            run_id=claim.run_id,
            program=program,
            step=claim.step,
            sequence=claim.sequence,
            recovery=claim.recovery,
            attempt=claim.attempt,
            logger_name=logger_name,
        ),
        "EVENTOR_HOST": step.host or "",
    }
