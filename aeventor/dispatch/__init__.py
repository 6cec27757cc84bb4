"""The dispatch core: the pure state machine, the transactions that advance a run (written
against the narrow store interface of :mod:`.store`), and the worker that claims, leases,
executes and records step runs in every mode.

Nothing here imports a concrete store, an executor, the command line or the agent.
"""

from ._state import (
    PENDING,
    FirePlan,
    Graph,
    StepOutcome,
    StepRunSigner,
    check_transition,
    final_run_status,
)

__all__ = (
    "PENDING",
    "FirePlan",
    "Graph",
    "StepOutcome",
    "StepRunSigner",
    "check_transition",
    "final_run_status",
)
