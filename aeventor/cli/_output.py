"""What the commands print: rich tables and trees, JSON, times and durations.

On a terminal rich colours and fits the terminal's width. Through a pipe or into a file the
output is plain text that never wraps, with no trailing spaces, so that scripts and tests
read stable lines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from ..program.model import RunStatus, StepStatus
from ..records import RunResult, StepRun

__all__ = (
    "SHORT_ID",
    "console",
    "duration_text",
    "emit",
    "iso",
    "print_json",
    "print_table",
    "run_json",
    "seconds",
    "status_text",
    "step_json",
    "time_text",
)

#: How many characters of a run id ``aeventor runs`` shows (``show`` takes any unique prefix).
SHORT_ID = 8

#: Wide enough that nothing printed through a pipe wraps.
_PIPE_WIDTH = 100_000

#: The style of each status on a terminal.
_STYLES = {
    "success": "green",
    "failure": "bold red",
    "lost": "bold red",
    "running": "yellow",
    "active": "yellow",
    "ready": "cyan",
    "waiting": "yellow",
    "cancelled": "magenta",
    "skipped": "dim",
}


def console() -> Console:
    """A console on stdout. Markup is off: names are printed as they are (``a[1]``)."""
    if sys.stdout.isatty():
        return Console(highlight=False, markup=False, emoji=False)
    return Console(highlight=False, markup=False, emoji=False, width=_PIPE_WIDTH)


def emit(out: Console, *renderables: RenderableType) -> None:
    """Print on a terminal; elsewhere render to plain lines without trailing spaces."""
    if out.is_terminal:
        out.print(*renderables)
        return
    with out.capture() as captured:
        out.print(*renderables)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    sys.stdout.write(text + "\n" if text else "")


def status_text(status: RunStatus | StepStatus | str | None) -> Text:
    """A status, coloured on a terminal; ``-`` for none."""
    if status is None:
        return Text("-")
    value = status if isinstance(status, str) else status.value
    return Text(value, style=_STYLES.get(value, ""))


def print_table(out: Console, header: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> None:
    """Aligned columns under a header, two spaces apart, without borders."""
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for name in header:
        table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    emit(out, table)


def time_text(when: datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration_text(start: datetime | None, end: datetime | None) -> str:
    """``20ms``, ``1.2s``, ``3m04s``, ``2h05m``, ``3d04h``; ``-`` when it has not ended."""
    if start is None or end is None:
        return "-"
    secs = max((end - start).total_seconds(), 0.0)
    if secs < 1:
        return f"{secs * 1000:.0f}ms"
    if secs < 60:
        return f"{secs:.1f}s"
    whole = int(secs)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def run_json(run: RunResult) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "program": run.program,
        "status": run.status.value,
        "reason": run.reason,
        "created": iso(run.created),
        "ended": iso(run.ended),
        "duration": seconds(run.created, run.ended),
    }


def step_json(step: StepRun) -> dict[str, Any]:
    return {
        "step": step.step,
        "sequence": step.sequence,
        "recovery": step.recovery,
        "attempt": step.attempt,
        "status": step.status.value,
        "host": step.host,
        "worker": step.worker,
        "pid": step.pid,
        "result": step.result,
        "error": step.error,
        "created": iso(step.created),
        "started": iso(step.started),
        "ended": iso(step.ended),
        "duration": seconds(step.started, step.ended),
    }


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=repr))
