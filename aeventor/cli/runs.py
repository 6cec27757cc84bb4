"""``aeventor submit``, ``runs``, ``show`` and ``db upgrade``: runs and their store."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping
from typing import Any

from ..backends.stores import open_store
from ..exceptions import ConfigurationError

__all__ = ("add_parsers",)

_PREFIX = "aeventor"


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
    submit.add_argument("--store", help="overrides the Eventor's store")
    submit.add_argument(
        "--trigger", action="append", default=[], metavar="EVENT[:SEQUENCE]", help="repeatable"
    )
    submit.add_argument("--wait", action="store_true", help="follow the run to its end")
    submit.set_defaults(handler=_submit_command, error_prefix=_PREFIX)

    runs = commands.add_parser(
        "runs", help="list runs, newest first", description="List runs, newest first."
    )
    runs.add_argument("--store", required=True, help="URL, sqlite path or store name")
    runs.add_argument("--program", help="only runs of this program")
    runs.add_argument("--limit", type=_positive_int, default=20, help="at most N runs")
    runs.set_defaults(handler=_runs_command, error_prefix=_PREFIX)

    show = commands.add_parser(
        "show",
        help="show a run and its step runs (exit 1 unless it succeeded)",
        description="Show a run and its step runs; exit 1 unless the run succeeded.",
    )
    show.add_argument("run_id")
    show.add_argument("--store", required=True, help="URL, sqlite path or store name")
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
    upgrade.add_argument("--store", required=True, help="URL, sqlite path or store name")
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
    asyncio.run(_upgrade(args.store))
    return 0


async def _upgrade(store: str) -> None:
    async with open_store(store, program="aeventor"):
        pass  # opening a store applies pending migrations
    print(f"store {store!r} is at the current schema")


def _runs_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    asyncio.run(_runs(args.store, args.program, args.limit))
    return 0


async def _runs(store: str, program: str | None, limit: int) -> None:
    async with open_store(store, program="aeventor") as db:
        runs = await db.list_runs(program=program, limit=limit)
    for run in runs:
        ended = run.ended.isoformat(timespec="seconds") if run.ended else "-"
        print(
            f"{run.run_id}  {run.program:<20} {run.status.value:<10} "
            f"{run.created.isoformat(timespec='seconds')}  {ended}"
        )


def _show_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    return asyncio.run(_show(args.store, args.run_id))


async def _show(store: str, run_id: str) -> int:
    async with open_store(store, program="aeventor") as db:
        result = await db.load_result(run_id)
    print(f"run {result.run_id} of {result.program}: {result.status.value}")
    if result.reason:
        print(f"  reason: {result.reason}")
    for step in result.steps:
        value = "" if step.result is None else f" -> {step.result!r}"
        print(f"  {step.step}[{step.sequence}] {step.status.value}{value}")
        if step.error:
            print("    " + step.error.strip().splitlines()[-1])
    return 0 if result else 1


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
        if args.store:
            ev.store = args.store
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
    if not args.store:
        raise ConfigurationError("submit --program needs --store")
    async with open_store(args.store, program=args.program) as db:
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
