"""``aeventor submit``, ``runs`` and ``db upgrade``: runs and their store."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.text import Text

from .. import queries
from ..backends.stores import open_store
from ..exceptions import ConfigurationError
from ..program.model import RunStatus
from . import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    SHOW_EXIT,
    STORE_ENV,
    STORE_HELP,
    store_from,
)
from ._output import (
    SHORT_ID,
    console,
    duration_text,
    print_json,
    print_table,
    run_json,
    status_text,
    time_text,
)

# SHOW_EXIT, print_json and run_json are re-exported: other command modules import them here.
__all__ = (
    "SHOW_EXIT",
    "add_db_parser",
    "add_parsers",
    "parse_since",
    "print_json",
    "run_json",
    "stopped_watching",
)

_PREFIX = "aeventor"


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``submit`` and ``runs`` under ``commands``."""
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


def add_db_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``db`` (``db upgrade``) under ``commands``."""
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


# -- db upgrade, runs ------------------------------------------------------------------------


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
    rows: list[list[str | Text]] = [
        [
            run.run_id[:SHORT_ID],
            run.program,
            status_text(run.status),
            time_text(run.created),
            duration_text(run.created, run.ended),
        ]
        for run in found
    ]
    print_table(console(), ["RUN", "PROGRAM", "STATUS", "CREATED (UTC)", "DURATION"], rows)
    return EXIT_OK


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


def stopped_watching(run_id: str) -> int:
    """Ctrl-C while following a run: one line saying the run goes on; exit 130."""
    print(
        f"stopped watching; run {run_id} goes on (aeventor show {run_id})",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _submit_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    submitted: list[str] = []
    try:
        return asyncio.run(_submit(args, environ, submitted))
    except KeyboardInterrupt:
        if submitted:
            return stopped_watching(submitted[0])
        print(f"{_PREFIX}: interrupted before the store returned a run id", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _submit(
    args: argparse.Namespace, environ: Mapping[str, str], submitted: list[str]
) -> int:
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
            submitted.append(run_id)
            print(run_id, flush=True)
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
        submitted.append(run_id)
        print(run_id, flush=True)
        if args.wait:
            result = await follow(db, run_id)
            print(f"run {run_id}: {result.status.value}")
            return 0 if result else 1
    return 0
