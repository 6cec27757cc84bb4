"""The one executor interface: how the worker has a claimed step run carried out.

Executors (:mod:`aeventor.backends.executors`: local processes and commands, in-loop
coroutines, SSH hosts) implement :class:`Executor`; the worker builds a :class:`StepLaunch`
for each claim and records the :class:`ExecResult` it gets back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..context import StepContext
from ..program.model import StepDef
from .claims import Claim

__all__ = ("ExecResult", "Executor", "StepLaunch")


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a step run ended: ``ok``, its JSON ``value``, or the ``error`` text."""

    ok: bool
    value: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepLaunch:
    """Everything needed to run one claimed step run."""

    claim: Claim
    step: StepDef
    program: str
    #: The step run's own variables (:func:`~aeventor.context.launch_env`); an executor adds
    #: what its process inherits with :func:`~aeventor.context.process_env`.
    env: Mapping[str, str]
    log_path: Path
    deterministic_logs: bool
    #: Awaited with the step's pid once its process started.
    on_started: Callable[[int], Awaitable[None]]
    #: The live callable, for in-loop steps.
    func: Callable[..., Any] | None = None
    context: StepContext | None = field(default=None)
    #: The level of the step's loggers (see :mod:`aeventor.dispatch.logs`).
    log_level: int = logging.INFO
    #: Fires ``(event, sequence)`` into the step's run for the step (its worker's
    #: ``trigger``): what ``aeventor.current_step().trigger`` reaches, in-loop or from a
    #: process step through its channel.
    on_trigger: Callable[[str, str], Awaitable[None]] | None = None
    #: Set only for an executor whose ``fences(step)`` said so: the worker has not fenced
    #: the start (:meth:`Store.launching <aeventor.dispatch.store.Store.launching>`). The
    #: executor awaits it with the pid once the step's process exists and before any of the
    #: step's code runs, *instead of* ``on_started``; on False the claim is no longer the
    #: worker's: the process must end without running the step (what :meth:`Executor.run`
    #: then returns is ignored).
    fence: Callable[[int], Awaitable[bool]] | None = None


class Executor(Protocol):
    """Runs step runs to their end. Cancelling :meth:`run` terminates the step (its whole
    process group) and propagates the cancellation.

    An executor may also have a ``fences(step) -> bool`` method: True when its :meth:`run`
    of ``step`` holds the step's process back until :attr:`StepLaunch.fence` said so (the
    worker then records the start once, with the real pid, instead of marking it started
    before the process exists and recording the pid after).
    """

    async def run(self, launch: StepLaunch) -> ExecResult: ...

    async def aclose(self) -> None: ...
