"""Stops a user's script from starting a run while a step subprocess imports it.

Kept apart from the runner (and free of heavy imports) because both the engine and the step
runner import it.
"""

from __future__ import annotations

import contextvars

__all__ = ("MainImportStopped", "check_not_importing", "importing_main")

#: Set while the step runner imports the user's main script: the script path.
importing_main: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aeventor_importing_main", default=None
)


class MainImportStopped(BaseException):
    """Raised by run()/start()/run_sync() while the runner imports the user's script.

    A BaseException so that a user's ``except Exception`` around the run does not swallow it.
    """


def check_not_importing() -> None:
    """Called by every entry point that starts a run or opens a store.

    Raises:
        MainImportStopped: inside a step subprocess that is importing the user's script:
            the script runs the program at module level; the runner stops the import there.
    """
    if importing_main.get() is not None:
        raise MainImportStopped
