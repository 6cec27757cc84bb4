"""The ``aeventor`` command line: one parser tree, a thin adapter over the library.

Every command is a subparser of ``aeventor``, registered by its module:

- :mod:`aeventor.cli.runs`: ``submit``, ``runs``, ``db upgrade``;
- :mod:`aeventor.cli.view`: ``show``, ``watch``, ``logs``, ``diff``, ``programs``;
- :mod:`aeventor.cli.ops`: ``cancel`` and ``cleanup``;
- :mod:`aeventor.cli.recovery`: ``recover`` and ``rerun``;
- :mod:`aeventor.cli.agent`: ``agent`` and ``agent start`` (over SSH);
- :mod:`aeventor.cli.config`: ``config genkey`` and ``config encrypt``.

``python -m aeventor.agent`` and ``python -m aeventor.config`` are ``aeventor agent`` and
``aeventor config``. A command parses its arguments, calls the library and returns an exit
code; :func:`main` turns the library's errors into exit codes and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from ..exceptions import (
    ConfigurationError,
    DatabaseError,
    ExecutorError,
    NoResult,
)
from ..program.model import RunStatus

__all__ = (
    "EXIT_BAD_INPUT",
    "EXIT_DATABASE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PIPE_CLOSED",
    "EXIT_RUNS_DIFFER",
    "EXIT_RUN_CANCELLED",
    "EXIT_RUN_ENDED",
    "EXIT_RUN_FAILED",
    "EXIT_RUN_RUNNING",
    "SHOW_EXIT",
    "STORE_ENV",
    "build_parser",
    "main",
    "store_from",
)

EXIT_OK = 0
#: ``show`` and ``watch`` of a run that failed; ``submit --wait`` of a run that did not
#: succeed.
EXIT_RUN_FAILED = 1
#: ``diff`` of two runs that differ (as diff(1)).
EXIT_RUNS_DIFFER = 1
#: Bad arguments or configuration, an unknown run, a host ``agent start`` cannot reach.
EXIT_BAD_INPUT = 2
#: The store failed, or its schema is not this aeventor's.
EXIT_DATABASE = 3
#: ``show`` of a run that is still running.
EXIT_RUN_RUNNING = 4
#: ``show`` and ``watch`` of a run that was cancelled.
EXIT_RUN_CANCELLED = 5
#: ``cancel`` of a run that had already ended (nothing changed).
EXIT_RUN_ENDED = 6
#: The output pipe closed before the command wrote everything (``aeventor runs | head``),
#: as a process killed by SIGPIPE reports it.
EXIT_PIPE_CLOSED = 141
#: Ctrl-C (SIGINT) in ``watch``, ``logs -f`` or ``submit --wait``: the run goes on.
EXIT_INTERRUPTED = 130

#: The exit code of ``show``, ``watch``, ``recover`` and ``rerun`` for each status of the run.
SHOW_EXIT = {
    RunStatus.success: EXIT_OK,
    RunStatus.failure: EXIT_RUN_FAILED,
    RunStatus.running: EXIT_RUN_RUNNING,
    RunStatus.cancelled: EXIT_RUN_CANCELLED,
}

_EPILOG = """\
exit codes:
  0  success; two runs that do not differ (diff)
  1  a run that failed (show, watch, recover, rerun), or did not succeed (submit --wait);
     two runs that differ (diff)
  2  bad input: wrong arguments or configuration, an unknown run or program, a run id
     prefix that several runs share, a missing key, sqlite file or log file, logs of a
     distributed run without --log-dir, an SSH host that agent start cannot reach
  3  a database error: the server refused the store's user or password (check the store
     URL or the named store's password), is unreachable, or failed; or the store's
     schema is older (run `aeventor db upgrade`) or newer than this aeventor's; one line
     on stderr names the store (password hidden)
  4  a run that is still running (show); recover refused: the run's controller is alive
  5  a run that was cancelled (show, watch)
  6  a run that had already ended (cancel), or nothing to recover: nothing changed
  130  interrupted (Ctrl-C) while following a run (watch, logs -f, submit --wait): the
       run goes on
  141  the output pipe closed early (e.g. `aeventor runs | head -1`); nothing more printed

Every command that takes --store defaults to $AEVENTOR_STORE (a URL, sqlite path or store
name) when --store is not given.

Each command has its own --help, e.g. `aeventor agent --help`, `aeventor agent start --help`.
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``handler`` and ``error_prefix`` defaults."""
    from .. import __version__
    from . import agent, config, ops, recovery, runs, view

    parser = argparse.ArgumentParser(
        prog="aeventor",
        description="aeventor: an asyncio event engine whose runs live in a SQL store.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    agent.add_parsers(commands)
    runs.add_parsers(commands)
    view.add_parsers(commands)
    runs.add_db_parser(commands)
    ops.add_parsers(commands)
    recovery.add_parsers(commands)
    config.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run one ``aeventor`` command.

    Args:
        argv: the arguments, without the program name; defaults to ``sys.argv[1:]``.
        environ: the environment commands read (key and config paths, the cluster key,
            variables forwarded by ``agent start``); defaults to :data:`os.environ`.

    Returns:
        The exit code (see the ``--help`` epilog). Usage errors, ``--help`` and
        ``--version`` exit through :class:`SystemExit` as argparse does.

    .. versionadded:: 0.1
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    try:
        code: int = args.handler(args, env)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the exit
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again on the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except (*_REPORTED, ExceptionGroup) as exc:
        # A TaskGroup (the agent's, one task per store) raises its children's errors as a
        # group: each error in it gets its line; anything else is a bug, re-raised.
        errors = _leaves(exc)
        if not all(isinstance(error, _REPORTED) for error in errors):
            raise
        for error in dict.fromkeys(str(error) for error in errors):
            print(f"{args.error_prefix}: {error}", file=sys.stderr)
        return min(_exit_code(error) for error in errors)
    return code


#: The variable ``--store`` defaults to.
STORE_ENV = "AEVENTOR_STORE"

#: ``--store``'s help, for every command that takes it.
STORE_HELP = f"URL, sqlite path or store name (default: ${STORE_ENV})"


def store_from(store: str | None, environ: Mapping[str, str]) -> str:
    """``--store``, else ``$AEVENTOR_STORE``.

    Raises:
        ConfigurationError: neither is given; the message names both.
    """
    store = store or environ.get(STORE_ENV) or None
    if store is None:
        raise ConfigurationError(
            f"no store: pass --store STORE (a URL, sqlite path or store name) or set ${STORE_ENV}"
        )
    return store


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


#: The errors a command reports in one line on stderr (with an exit code), not a traceback.
_REPORTED = (ConfigurationError, ExecutorError, DatabaseError)


def _exit_code(exc: BaseException) -> int:
    # NoResult is a DatabaseError, but an unknown run id is the caller's input.
    if isinstance(exc, DatabaseError) and not isinstance(exc, NoResult):
        return EXIT_DATABASE
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
