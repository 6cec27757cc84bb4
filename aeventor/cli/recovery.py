"""``aeventor recover`` and ``aeventor rerun``: continue a run in a new recovery generation."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping

from ..exceptions import NothingToRecover, ProgramChanged, RunStillRunning
from ..records import RunResult
from . import (
    EXIT_BAD_INPUT,
    EXIT_DATABASE,
    EXIT_OK,
    EXIT_RUN_CANCELLED,
    EXIT_RUN_ENDED,
    EXIT_RUN_FAILED,
    EXIT_RUN_RUNNING,
    STORE_HELP,
    store_from,
)
from .runs import SHOW_EXIT, print_json, run_json

__all__ = ("add_parsers",)

_PREFIX = "aeventor"

_EPILOG = f"""\
exit codes:
  {EXIT_OK}  the run succeeded
  {EXIT_RUN_FAILED}  the run failed again
  {EXIT_BAD_INPUT}  bad input: no run has this id (or prefix), no such step or sequence, a
     newer version of the run's program exists (pass --force), a step only its script can
     run (recover from the script with ev.run(recover=RUN))
  {EXIT_DATABASE}  a database error
  {EXIT_RUN_RUNNING}  refused: the run's controller, or a worker running its steps, is alive;
     (continue) the run goes on: more is due later
  {EXIT_RUN_CANCELLED}  the run was cancelled (Ctrl-C cancels it: recover it again to go on)
  {EXIT_RUN_ENDED}  refused: nothing to recover (the run succeeded, or every step run that
     did not succeed has recovery='skip')
"""


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``recover`` and ``rerun`` under ``commands``."""
    recover = commands.add_parser(
        "recover",
        help="continue a failed, cancelled or abandoned run",
        description="Continue a run that failed, was cancelled, or whose controller died, "
        "in a new recovery generation: the step runs that succeeded are kept and never run "
        "again; those that failed, were lost, cancelled or skipped run again (unless their "
        "step has recovery='skip'), and what they trigger follows. A standalone run is "
        "driven here to its end (with the program definition stored with the run); a "
        "distributed run's steps go to its agents, and this command follows the run. A "
        "controller that ran on this host is known dead from its pid at once; one on "
        "another host once its lease lapsed.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recover.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    _common(recover)
    recover.set_defaults(handler=_recover_command, error_prefix=_PREFIX)

    rerun = commands.add_parser(
        "rerun",
        help="run one step run of a run again, and what follows it",
        description="Run one step run of an ended run again, whatever its outcome, in a new "
        "recovery generation, and everything it triggers after it. Other step runs are "
        "kept.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rerun.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    rerun.add_argument("step", metavar="STEP", help="the step to run again")
    rerun.add_argument(
        "--sequence",
        metavar="S",
        help="the step's sequence (default: the only one it ran for)",
    )
    _common(rerun)
    rerun.set_defaults(handler=_rerun_command, error_prefix=_PREFIX)

    cont = commands.add_parser(
        "continue",
        help="act on what is due now in a run, and return",
        description="Continue a standalone run whose controller stopped or died, in its "
        "generation (the original's RunMode.continue): its ready step runs, the delays and "
        "retries that came due, and what they cause, run here; then the command returns, "
        "the run still running if more is due later (run it again then, from cron for "
        "example). Nothing is run again: `aeventor recover` does that.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cont.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    cont.add_argument("--store", help=STORE_HELP)
    cont.add_argument(
        "--max-concurrency", type=int, metavar="N", help="most step runs executing at once"
    )
    cont.add_argument("--json", action="store_true", help="print the run as a JSON object")
    cont.set_defaults(handler=_continue_command, error_prefix=_PREFIX)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help=STORE_HELP)
    parser.add_argument(
        "--force",
        action="store_true",
        help="recover even though a newer version of the run's program was registered "
        "(the run's own version is used)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="most step runs executing at once (standalone runs)",
    )
    parser.add_argument("--json", action="store_true", help="print the run as a JSON object")


def _recover_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from ..recovery import recover

    store = store_from(args.store, environ)
    return _report(
        args,
        lambda: recover(store, args.run_id, force=args.force, max_concurrency=args.max_concurrency),
    )


def _rerun_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from ..recovery import rerun

    store = store_from(args.store, environ)
    return _report(
        args,
        lambda: rerun(
            store,
            args.run_id,
            args.step,
            sequence=args.sequence,
            force=args.force,
            max_concurrency=args.max_concurrency,
        ),
    )


def _continue_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from ..recovery import continue_run

    store = store_from(args.store, environ)
    return _report(
        args, lambda: continue_run(store, args.run_id, max_concurrency=args.max_concurrency)
    )


def _report(args: argparse.Namespace, call: object) -> int:
    assert callable(call)
    try:
        result: RunResult = asyncio.run(call())
    except RunStillRunning as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return EXIT_RUN_RUNNING
    except NothingToRecover as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return EXIT_RUN_ENDED
    except ProgramChanged as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"{_PREFIX}: interrupted: run {args.run_id} was cancelled; "
            f"`aeventor recover {args.run_id}` continues it",
            file=sys.stderr,
        )
        return EXIT_RUN_CANCELLED
    if args.json:
        print_json(
            {
                **run_json(result),
                "recovery": result.recovery,
                "rerun": [
                    {"step": s.step, "sequence": s.sequence, "status": s.status.value}
                    for s in result.steps
                    if s.recovery == result.recovery
                ],
            }
        )
    elif args.handler is _continue_command:
        print(f"run {result.run_id} of {result.program}: continued")
        print(f"run {result.run_id}: {result.status.value}")
    else:
        again = [s for s in result.steps if s.recovery == result.recovery]
        print(f"run {result.run_id} of {result.program}: recovery {result.recovery}")
        for step in again:
            print(f"  {step.step}[{step.sequence}] {step.status.value}")
            if step.error:
                print("    " + step.error.strip().splitlines()[-1])
        print(f"run {result.run_id}: {result.status.value}")
    return SHOW_EXIT[result.status]
