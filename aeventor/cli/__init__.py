"""The ``aeventor`` command line: a thin adapter over the library.

Commands:
    aeventor agent --store STORE --host NAME ...      run this host's agent (see --help)
    aeventor agent start --host NAME [--ssh [USER@]ADDR[:PORT]] -- AGENT ARGS...   over SSH
    aeventor submit SCRIPT.py:NAME|MODULE:NAME --store STORE [--trigger EVENT[:SEQ]] [--wait]
    aeventor submit --program NAME --store STORE --trigger EVENT[:SEQ] [--wait]
    aeventor db upgrade --store STORE     bring a store's schema to this version
    aeventor runs --store STORE [--program NAME] [--limit N]
    aeventor show RUN_ID --store STORE    a run and its step runs
    aeventor config genkey|encrypt ...    keys and encrypted passwords for named stores

Exit codes: 0 success, 1 a run that did not succeed (``show``), 2 bad input or
configuration, 3 a database error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import sqlalchemy as sa

from ..backends.stores import open_store
from ..backends.stores import schema as _schema
from ..exceptions import ConfigurationError, DatabaseError, NoResult

__all__ = ("main",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aeventor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="manage a store's schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply pending migrations")
    upgrade.add_argument("--store", required=True, help="URL, sqlite path or store name")

    runs = sub.add_parser("runs", help="list runs, newest first")
    runs.add_argument("--store", required=True)
    runs.add_argument("--program", help="only runs of this program")
    runs.add_argument("--limit", type=int, default=20)

    show = sub.add_parser("show", help="show a run and its step runs")
    show.add_argument("run_id")
    show.add_argument("--store", required=True)

    submit = sub.add_parser("submit", help="submit a run to the agents (distributed mode)")
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

    config = sub.add_parser("config", help="keys and encrypted passwords (see aeventor.config)")
    config.add_argument("args", nargs=argparse.REMAINDER)
    return parser


async def _upgrade(store: str) -> None:
    async with open_store(store, program="aeventor"):
        pass  # opening a store applies pending migrations
    print(f"store {store!r} is at the current schema")


async def _runs(store: str, program: str | None, limit: int) -> None:
    async with open_store(store, program="aeventor") as db, db.reading() as conn:
        query = sa.select(_schema.run).order_by(_schema.run.c.created.desc()).limit(limit)
        if program:
            query = query.where(_schema.run.c.program_name == program)
        for row in await conn.execute(query):
            ended = row.ended.isoformat(timespec="seconds") if row.ended else "-"
            print(
                f"{row.id}  {row.program_name:<20} {row.status:<10} "
                f"{row.created.isoformat(timespec='seconds')}  {ended}"
            )


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


async def _submit(args: argparse.Namespace) -> int:
    from ..dispatch._state import Graph
    from ..signing import load_cluster_key
    from ..submission import follow, submit

    triggers = [_parse_trigger(t) for t in args.trigger]
    if (args.target is None) == (args.program is None):
        raise ConfigurationError("submit: name a TARGET (SCRIPT.py:NAME) or --program NAME")
    key = load_cluster_key()
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        from .. import agent

        if argv[1:2] == ["start"]:
            return agent.start_main(argv[2:])
        return agent.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "submit":
            return asyncio.run(_submit(args))
        if args.command == "config":
            from ..config import main as config_main

            return config_main(args.args)
        if args.command == "db":
            asyncio.run(_upgrade(args.store))
            return 0
        if args.command == "runs":
            asyncio.run(_runs(args.store, args.program, args.limit))
            return 0
        return asyncio.run(_show(args.store, args.run_id))
    except NoResult as exc:
        print(f"aeventor: {exc}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:
        print(f"aeventor: {exc}", file=sys.stderr)
        return 2
    except DatabaseError as exc:
        print(f"aeventor: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
