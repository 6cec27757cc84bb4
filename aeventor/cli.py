"""The ``aeventor`` command line: a thin adapter over the library.

Commands:
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

import sqlalchemy as sa

from . import _schema
from .backends import open_store
from .exceptions import ConfigurationError, DatabaseError, NoResult

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            from .config import main as config_main

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
