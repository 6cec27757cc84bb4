"""``aeventor submit``, ``runs``, ``show`` and ``db upgrade``: runs and their store."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import queries
from ..backends.stores import open_store
from ..exceptions import ConfigurationError
from ..program.model import RunStatus
from ..records import RunResult, StepRun
from . import (
    EXIT_BAD_INPUT,
    EXIT_DATABASE,
    EXIT_OK,
    EXIT_RUN_CANCELLED,
    EXIT_RUN_FAILED,
    EXIT_RUN_RUNNING,
    STORE_ENV,
    STORE_HELP,
    store_from,
)

__all__ = ("SHOW_EXIT", "add_parsers", "parse_since", "print_json", "run_json")

_PREFIX = "aeventor"

#: ``aeventor show``'s exit code for each status of the run.
SHOW_EXIT = {
    RunStatus.success: EXIT_OK,
    RunStatus.failure: EXIT_RUN_FAILED,
    RunStatus.running: EXIT_RUN_RUNNING,
    RunStatus.cancelled: EXIT_RUN_CANCELLED,
}

_SHOW_EPILOG = f"""\
exit codes:
  {EXIT_OK}  the run succeeded
  {EXIT_RUN_FAILED}  the run failed
  {EXIT_BAD_INPUT}  bad input: no run has this id (or prefix), or several do; a missing sqlite file
  {EXIT_DATABASE}  a database error, or a schema older than this aeventor (run `aeventor db upgrade`)
  {EXIT_RUN_RUNNING}  the run is still running
  {EXIT_RUN_CANCELLED}  the run was cancelled
"""


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``submit``, ``runs``, ``show`` and ``db`` under ``commands``."""
    submit = commands.add_parser(
        "submit",
        help="submit a run to the agents (distributed mode)",
        description="Submit a run of a program to the agents (distributed mode).",
    )
    submit.add_argument(
        "target",
        nargs="?",
        help="SCRIPT.py:NAME or MODULE:NAME: an Eventor, or a function returning one",
    )
    submit.add_argument("--program", help="submit the newest registered version of a program")
    submit.add_argument(
        "--store", help=f"overrides the Eventor's store (default: ${STORE_ENV} if set)"
    )
    submit.add_argument(
        "--trigger", action="append", default=[], metavar="EVENT[:SEQUENCE]", help="repeatable"
    )
    submit.add_argument("--wait", action="store_true", help="follow the run to its end")
    submit.set_defaults(handler=_submit_command, error_prefix=_PREFIX)

    runs = commands.add_parser(
        "runs",
        help="list runs, newest first",
        description="List runs, newest first: a table, or a JSON list with --json. Reads "
        "only: never creates nor migrates the store.",
    )
    runs.add_argument("--store", help=STORE_HELP)
    runs.add_argument("--program", help="only runs of this program")
    runs.add_argument(
        "--status", choices=[s.value for s in RunStatus], help="only runs in this status"
    )
    runs.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="only runs created in the last 30m, 2h, 7d (s, m, h, d, w), or since an ISO "
        "date or time (UTC unless it names a zone)",
    )
    runs.add_argument("--limit", type=_positive_int, default=20, help="at most N runs")
    runs.add_argument("--json", action="store_true", help="print a JSON list")
    runs.set_defaults(handler=_runs_command, error_prefix=_PREFIX)

    show = commands.add_parser(
        "show",
        help="show a run and its step runs (exit code: its status)",
        description="Show a run and its step runs. Reads only: never creates nor migrates "
        "the store.",
        epilog=_SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    show.add_argument("--store", help=STORE_HELP)
    show.add_argument("--json", action="store_true", help="print the run as a JSON object")
    show.set_defaults(handler=_show_command, error_prefix=_PREFIX)

    db = commands.add_parser(
        "db",
        help="manage a store's schema: db upgrade",
        description="Manage a store's schema.",
    )
    db_commands = db.add_subparsers(
        title="commands", dest="db_command", required=True, metavar="COMMAND"
    )
    upgrade = db_commands.add_parser(
        "upgrade",
        help="apply pending migrations",
        description="Bring a store's schema to this version of aeventor.",
    )
    upgrade.add_argument("--store", help=STORE_HELP)
    upgrade.set_defaults(handler=_upgrade_command, error_prefix=_PREFIX)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


# -- db upgrade, runs, show -------------------------------------------------------------------


def _upgrade_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    asyncio.run(_upgrade(store_from(args.store, environ)))
    return EXIT_OK


async def _upgrade(store: str) -> None:
    async with open_store(store, program="aeventor"):
        pass  # opening a store applies pending migrations
    print(f"store {store!r} is at the current schema")


def _runs_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    found = asyncio.run(
        queries.runs(
            store_from(args.store, environ),
            program=args.program,
            status=args.status,
            since=args.since,
            limit=args.limit,
        )
    )
    if args.json:
        print_json([run_json(run) for run in found])
        return EXIT_OK
    rows = [
        [
            run.run_id[:SHORT_ID],
            run.program,
            run.status.value,
            _time(run.created),
            _duration(run.created, run.ended),
        ]
        for run in found
    ]
    _print_table(["RUN", "PROGRAM", "STATUS", "CREATED (UTC)", "DURATION"], rows)
    return EXIT_OK


def _show_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    result = asyncio.run(queries.run_result(store_from(args.store, environ), args.run_id))
    if args.json:
        print_json({**run_json(result), "steps": [_step_json(s) for s in result.steps]})
    else:
        _print_result(result)
    return SHOW_EXIT[result.status]


def _print_result(result: RunResult) -> None:
    print(f"run {result.run_id} of {result.program}: {result.status.value}")
    print(f"  created {_time(result.created)}, duration {_duration(result.created, result.ended)}")
    if result.reason:
        print(f"  reason: {result.reason}")
    for step in result.steps:
        value = "" if step.result is None else f" -> {step.result!r}"
        where = f" on {step.host}" if step.host else ""
        pid = f" pid {step.pid}" if step.pid else ""
        print(
            f"  {step.step}[{step.sequence}] {step.status.value}{value}"
            f"  (attempt {step.attempt}{where}{pid}, {_duration(step.started, step.ended)})"
        )
        if step.error:
            print("    " + step.error.strip().splitlines()[-1])


# -- formatting -------------------------------------------------------------------------------

#: How many characters of a run id ``aeventor runs`` shows (``show`` takes any unique prefix).
SHORT_ID = 8


def _time(when: datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(start: datetime | None, end: datetime | None) -> str:
    """``20ms``, ``1.2s``, ``3m04s``, ``2h05m``, ``3d04h``; ``-`` when it has not ended."""
    if start is None or end is None:
        return "-"
    seconds = max((end - start).total_seconds(), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def run_json(run: RunResult) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "program": run.program,
        "status": run.status.value,
        "reason": run.reason,
        "created": _iso(run.created),
        "ended": _iso(run.ended),
        "duration": _seconds(run.created, run.ended),
    }


def _step_json(step: StepRun) -> dict[str, Any]:
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
        "created": _iso(step.created),
        "started": _iso(step.started),
        "ended": _iso(step.ended),
        "duration": _seconds(step.started, step.ended),
    }


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=repr))


_SINCE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> datetime | timedelta:
    """``--since``: ``30m``, ``2h``, ``7d`` (a time before now) or an ISO date or time.

    A date or time without a zone is UTC, as ``aeventor runs`` shows times.

    Raises:
        argparse.ArgumentTypeError: neither; the message shows both forms.
    """
    match = _SINCE.fullmatch(text.strip().lower())
    if match:
        return timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write a time before now as 30m, 2h, 7d (s, m, h, d, w), or a "
            "date or time as 2026-12-01 or 2026-12-01T08:00"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


# -- submit -----------------------------------------------------------------------------------


def _parse_trigger(text: str) -> tuple[str, str]:
    event, _, sequence = text.partition(":")
    if not event:
        raise ConfigurationError(f"--trigger {text!r}: write it as EVENT or EVENT:SEQUENCE")
    return event, sequence or "0"


def _load_target(target: str) -> Any:
    """The Eventor a ``SCRIPT.py:NAME`` or ``MODULE:NAME`` names."""
    import importlib
    import importlib.util
    from pathlib import Path

    from .. import Eventor
    from ..guard import MainImportStopped, importing_main

    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise ConfigurationError(
            f"{target!r}: name the program as SCRIPT.py:NAME or MODULE:NAME, where NAME is an "
            "Eventor or a function returning one"
        )
    if where.endswith(".py") or "/" in where:
        path = Path(where).resolve()
        if not path.is_file():
            raise ConfigurationError(f"{target!r}: no script {str(path)!r}")
        sys.path.insert(0, str(path.parent))
        # Loaded like the step runner loads it: its __main__ guard stays shut, and functions
        # defined in it are found by agents through the script's path.
        spec = importlib.util.spec_from_file_location("__aeventor_main__", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["__aeventor_main__"] = module
        token = importing_main.set(str(path))
        try:
            spec.loader.exec_module(module)
        except MainImportStopped:
            pass
        finally:
            importing_main.reset(token)
    else:
        module = importlib.import_module(where)
    value = getattr(module, name, None)
    if value is None:
        raise ConfigurationError(f"{target!r}: {where} has no {name!r}")
    if not isinstance(value, Eventor) and callable(value):
        value = value()
    if not isinstance(value, Eventor):
        raise ConfigurationError(f"{target!r} is not an Eventor nor a function returning one")
    return value


def _submit_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    return asyncio.run(_submit(args, environ))


async def _submit(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from ..dispatch import Graph
    from ..signing import load_cluster_key
    from ..submission import follow, submit

    triggers = [_parse_trigger(t) for t in args.trigger]
    if (args.target is None) == (args.program is None):
        raise ConfigurationError("submit: name a TARGET (SCRIPT.py:NAME) or --program NAME")
    key = load_cluster_key(environ=environ)
    if args.target is not None:
        ev = _load_target(args.target)
        ev.mode = "distributed"
        store = args.store or environ.get(STORE_ENV)
        if store:
            ev.store = store
        for event, sequence in triggers:
            ev.trigger_event(event, sequence)
        async with ev:
            run_id = await ev.submit()
            print(run_id)
            if args.wait:
                assert ev._db is not None
                result = await follow(ev._db, run_id)
                print(f"run {run_id}: {result.status.value}")
                return 0 if result else 1
        return 0
    async with open_store(store_from(args.store, environ), program=args.program) as db:
        program = await db.latest_program(args.program)
        for event, _ in triggers:
            if event not in program.events:
                raise ConfigurationError(
                    f"--trigger {event!r}: program {args.program!r} has no such event"
                )
        Graph(program)
        run_id = await submit(db, program, triggers, key=key)
        print(run_id)
        if args.wait:
            result = await follow(db, run_id)
            print(f"run {run_id}: {result.status.value}")
            return 0 if result else 1
    return 0
