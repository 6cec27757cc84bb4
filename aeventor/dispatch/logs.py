"""Log files of a run: one program log per run, one log per step run.

Layout: ``<log_dir>/<program>/<run_id>/program.log`` and ``<step>.<sequence>.log`` beside it
(``.<attempt>`` added for retries). With ``deterministic_logs`` no line carries a timestamp
or a pid, so two runs' directories can be compared with ``diff -r``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from ..records import run_log_dir, step_log_path

__all__ = ("RunLog", "run_log_dir", "step_log_path")


class RunLog:
    """The program log of one run. Lines are buffered and appended by :meth:`flush`."""

    def __init__(self, path: Path, *, level: int, deterministic: bool) -> None:
        self.path = path
        self.level = level
        self.deterministic = deterministic
        self._buffer: list[str] = []

    def log(self, level: int, message: str) -> None:
        if level < self.level:
            return
        name = logging.getLevelName(level)
        if self.deterministic:
            self._buffer.append(f"{name} {message}\n")
        else:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            self._buffer.append(f"{stamp} {name} [pid={os.getpid()}] {message}\n")

    def info(self, message: str) -> None:
        self.log(logging.INFO, message)

    def debug(self, message: str) -> None:
        self.log(logging.DEBUG, message)

    def error(self, message: str) -> None:
        self.log(logging.ERROR, message)

    async def flush(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        await asyncio.to_thread(_append, self.path, "".join(lines))


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
