"""``aeventor cancel`` and ``aeventor cleanup``: act on a store's runs."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Mapping
from datetime import UTC, timedelta

from .. import queries
from ..exceptions import ConfigurationError
from . import (
    EXIT_BAD_INPUT,
    EXIT_DATABASE,
    EXIT_OK,
    EXIT_RUN_ENDED,
    STORE_HELP,
    store_from,
)
from ._output import print_json, run_json

__all__ = ("add_parsers", "parse_age")

_PREFIX = "aeventor"

_CANCEL_EPILOG = f"""\
exit codes:
  {EXIT_OK}  the run was cancelled: its workers terminate its running steps at their next
     heartbeat
  {EXIT_BAD_INPUT}  bad input: no run has this id (or prefix), or several do; no store given;
     STEP has no ready or running step run (for --sequence)
  {EXIT_DATABASE}  a database error, or a schema older than this aeventor (run `aeventor db upgrade`)
  {EXIT_RUN_ENDED}  the run had already ended (success, failure or cancelled): nothing changed
"""


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``cancel`` and ``cleanup`` under ``commands``."""
    cancel = commands.add_parser(
        "cancel",
        help="cancel a running run, or one step run of it",
        description="Cancel a running run, standalone or distributed: it is recorded as "
        "cancelled and the workers running its steps terminate them at their next "
        "heartbeat. With STEP, cancel only that step's ready or running step run: it is "
        "terminated and recorded cancelled, and the run reacts as to a failure of the step "
        "(its failure triggers fire; without one the run stops). Never creates nor "
        "migrates the store.",
        epilog=_CANCEL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cancel.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    cancel.add_argument("step", metavar="STEP", nargs="?", help="cancel only this step's run")
    cancel.add_argument(
        "--sequence", metavar="S", help="STEP's sequence (default: the one ready or running)"
    )
    cancel.add_argument("--store", help=STORE_HELP)
    cancel.add_argument(
        "--reason", default="cancelled by aeventor cancel", help="recorded as the run's reason"
    )
    cancel.add_argument(
        "--json", action="store_true", help='print the run as a JSON object, with "cancelled"'
    )
    cancel.set_defaults(handler=_cancel_command, error_prefix=_PREFIX)

    cleanup = commands.add_parser(
        "cleanup",
        help="delete runs that ended long ago, and their logs",
        description="Delete the runs that ended (success, failure, cancelled) before the "
        "cutoff, with their step runs, triggers and log directories "
        f"(LOG_DIR/PROGRAM/RUN), {queries.CLEANUP_BATCH} runs per transaction. Running "
        "runs are never touched. Prints how many runs of each program it deletes. Never "
        "creates nor migrates the store.",
    )
    cleanup.add_argument(
        "--older-than",
        required=True,
        type=parse_age,
        metavar="AGE",
        help="runs that ended more than AGE ago: 30d, 12h, 2w (s, m, h, d, w)",
    )
    cleanup.add_argument("--program", help="only runs of this program")
    cleanup.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    cleanup.add_argument(
        "--log-dir",
        default="aeventor_logs",
        help="the Eventors' log directory (default: ./aeventor_logs, as Eventor's)",
    )
    cleanup.add_argument("-v", "--verbose", action="store_true", help="also list each run")
    cleanup.add_argument("--json", action="store_true", help="print a JSON object")
    cleanup.add_argument("--store", help=STORE_HELP)
    cleanup.set_defaults(handler=_cleanup_command, error_prefix=_PREFIX)


_AGE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``--older-than``: ``30d``, ``12h``, ``2w`` (s, m, h, d, w).

    Raises:
        argparse.ArgumentTypeError: not one of those; the message shows the form.
    """
    match = _AGE.fullmatch(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: write an age as 30d, 12h, 2w (s, m, h, d, w)")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def _cancel_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    store = store_from(args.store, environ)
    if args.step is None and args.sequence is not None:
        raise ConfigurationError("cancel: --sequence goes with a STEP")
    try:
        result = asyncio.run(
            queries.cancel(
                store, args.run_id, reason=args.reason, step=args.step, sequence=args.sequence
            )
        )
    except queries.RunEnded as exc:
        if args.json:
            print_json({"cancelled": False, **run_json(exc.result)})
        print(f"{_PREFIX}: {exc}; nothing to cancel", file=sys.stderr)
        return EXIT_RUN_ENDED
    if args.json:
        print_json({"cancelled": True, **run_json(result)})
        return EXIT_OK
    if args.step is not None:
        print(
            f"step {args.step} of run {result.run_id} cancelled; its worker terminates it at "
            f"its next heartbeat; the run is {result.status.value}"
        )
        return EXIT_OK
    print(
        f"run {result.run_id} of {result.program} cancelled; its workers terminate its "
        "running steps at their next heartbeat"
    )
    return EXIT_OK


def _cleanup_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    store = store_from(args.store, environ)
    done = asyncio.run(
        queries.cleanup(
            store,
            older_than=args.older_than,
            program=args.program,
            dry_run=args.dry_run,
            log_dir=args.log_dir,
        )
    )
    if args.json:
        print_json(
            {
                "dry_run": done.dry_run,
                "before": done.before.isoformat(),
                "per_program": done.per_program(),
                "runs": [run_json(run) for run in done.runs],
                "log_dirs": [str(path) for path in done.log_dirs],
            }
        )
        return EXIT_OK
    verb = "would delete" if done.dry_run else "deleted"
    if args.verbose:
        for run in done.runs:
            ended = "-" if run.ended is None else f"{run.ended.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
            print(f"{verb} run {run.run_id} of {run.program}: {run.status.value}, ended {ended}")
    for program, count in done.per_program().items():
        print(f"{program}: {verb} {count} run{'' if count == 1 else 's'}")
    runs, dirs = len(done.runs), len(done.log_dirs)
    print(
        f"{verb} {runs} run{'' if runs == 1 else 's'} that ended before "
        f"{done.before:%Y-%m-%d %H:%M:%S} UTC and {dirs} log "
        f"director{'y' if dirs == 1 else 'ies'}"
    )
    return EXIT_OK
