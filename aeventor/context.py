"""The context a running step sees: who it is, and (in-loop) how to fire events."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .exceptions import AeventorError

if TYPE_CHECKING:
    from .program.model import StepDef

__all__ = ("StepContext", "bind_step", "current_step", "launch_env", "step_env")


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


def current_step() -> StepContext:
    """The :class:`StepContext` of the in-loop step running in this task.

    Raises:
        AeventorError: when called outside an in-loop step.

    .. versionadded:: 0.1
    """
    try:
        return _current.get()
    except LookupError:
        raise AeventorError(
            "current_step() is only available inside an in-loop (async def) step; "
            "subprocess steps read the EVENTOR_* environment variables instead"
        ) from None


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
