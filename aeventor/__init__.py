"""aeventor: an asyncio event engine.

A program declares events and steps; an event (or a boolean expression of events) triggers
the steps associated with it; a step's outcome triggers further events. Runs are kept in a
SQL database so they can be monitored, recovered and rerun.

Names are imported lazily on first use: a step subprocess that imports the user's script
(which imports aeventor) then pays for SQLAlchemy only if the script uses the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._eventor import Event, Eventor, Group, RunHandle, Step, attach
    from .context import StepContext, current_step
    from .exceptions import (
        AeventorError,
        ConfigurationError,
        DatabaseError,
        ExecutorError,
        NothingToRecover,
        ProgramChanged,
        ProgramDefinitionError,
        RecoveryRefused,
        RunStillRunning,
        SerializationError,
        StoreConfigError,
        UnguardedMainError,
    )
    from .program.expr import and_, or_
    from .program.model import ProgramDef, Retry, RunStatus, StepStatus
    from .queries import (
        AmbiguousRunId,
        Cleanup,
        RunEnded,
        cancel,
        cleanup,
        programs,
        run_result,
        runs,
    )
    from .records import ProgramSummary, RunResult, StepRun
    from .recovery import continue_run, recover, rerun

__version__ = "0.1.0.dev0"

_WHERE = {
    "AeventorError": "exceptions",
    "AmbiguousRunId": "queries",
    "Cleanup": "queries",
    "RunEnded": "queries",
    "cancel": "queries",
    "cleanup": "queries",
    "ConfigurationError": "exceptions",
    "DatabaseError": "exceptions",
    "Event": "_eventor",
    "Eventor": "_eventor",
    "Group": "_eventor",
    "attach": "_eventor",
    "ExecutorError": "exceptions",
    "ProgramDefinitionError": "exceptions",
    "ProgramDef": "program.model",
    "ProgramSummary": "records",
    "Retry": "program.model",
    "RunHandle": "_eventor",
    "RunResult": "records",
    "RunStatus": "program.model",
    "SerializationError": "exceptions",
    "Step": "_eventor",
    "StepContext": "context",
    "StepRun": "records",
    "StepStatus": "program.model",
    "StoreConfigError": "exceptions",
    "UnguardedMainError": "exceptions",
    "NothingToRecover": "exceptions",
    "ProgramChanged": "exceptions",
    "RecoveryRefused": "exceptions",
    "RunStillRunning": "exceptions",
    "recover": "recovery",
    "continue_run": "recovery",
    "rerun": "recovery",
    "and_": "program.expr",
    "current_step": "context",
    "or_": "program.expr",
    "programs": "queries",
    "run_result": "queries",
    "runs": "queries",
}

__all__ = (
    "AeventorError",
    "AmbiguousRunId",
    "Cleanup",
    "ConfigurationError",
    "DatabaseError",
    "Event",
    "Eventor",
    "ExecutorError",
    "Group",
    "NothingToRecover",
    "ProgramChanged",
    "ProgramDef",
    "ProgramDefinitionError",
    "ProgramSummary",
    "RecoveryRefused",
    "Retry",
    "RunEnded",
    "RunHandle",
    "RunResult",
    "RunStatus",
    "RunStillRunning",
    "SerializationError",
    "Step",
    "StepContext",
    "StepRun",
    "StepStatus",
    "StoreConfigError",
    "UnguardedMainError",
    "and_",
    "attach",
    "cancel",
    "cleanup",
    "continue_run",
    "current_step",
    "or_",
    "programs",
    "recover",
    "rerun",
    "run_result",
    "runs",
)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'aeventor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
