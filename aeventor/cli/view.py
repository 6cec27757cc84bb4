"""``aeventor show``, ``watch``, ``logs``, ``diff`` and ``programs``: looking at runs.

Each only reads the store (never creating nor migrating it) through :mod:`aeventor.queries`
and prints what it returns: rich tables and trees, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .. import queries
from ..exceptions import ConfigurationError
from ..program.model import RunStatus, StepStatus
from ..records import RunResult, StepRun
from . import (
    EXIT_BAD_INPUT,
    EXIT_DATABASE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_CANCELLED,
    EXIT_RUN_FAILED,
    EXIT_RUN_RUNNING,
    EXIT_RUNS_DIFFER,
    SHOW_EXIT,
    STORE_HELP,
    store_from,
)
from ._output import (
    SHORT_ID,
    console,
    duration_text,
    emit,
    print_json,
    print_table,
    run_json,
    status_text,
    step_json,
    time_text,
)
from .runs import stopped_watching

__all__ = ("add_parsers",)

_PREFIX = "aeventor"

_COMMON_CODES = f"""\
  {EXIT_BAD_INPUT}  bad input: no run has this id (or prefix), or several do; a missing sqlite file
  {EXIT_DATABASE}  a database error, or a schema older than this aeventor (run `aeventor db upgrade`)
"""

_SHOW_EPILOG = f"""\
exit codes:
  {EXIT_OK}  the run succeeded
  {EXIT_RUN_FAILED}  the run failed
{_COMMON_CODES}\
  {EXIT_RUN_RUNNING}  the run is still running
  {EXIT_RUN_CANCELLED}  the run was cancelled
"""

_WATCH_EPILOG = f"""\
exit codes (the run's end, as show's):
  {EXIT_OK}  the run succeeded
  {EXIT_RUN_FAILED}  the run failed
{_COMMON_CODES}\
  {EXIT_RUN_CANCELLED}  the run was cancelled
  {EXIT_INTERRUPTED}  Ctrl-C: watching stopped, the run goes on
"""

_LOGS_EPILOG = f"""\
exit codes:
  {EXIT_OK}  printed (with -f: the run has ended)
  {EXIT_BAD_INPUT}  bad input: an unknown run or step, a step that ran for several sequences
     (name one as STEP.SEQ), a missing log file, a distributed run without --log-dir
  {EXIT_DATABASE}  a database error, or a schema older than this aeventor
  {EXIT_INTERRUPTED}  Ctrl-C while following (-f)
"""

_DIFF_EPILOG = f"""\
exit codes (as diff(1)):
  {EXIT_OK}  the runs do not differ: same step outcomes, same logs once normalised
  {EXIT_RUNS_DIFFER}  the runs differ
{_COMMON_CODES}"""

_READS_ONLY = "Reads only: never creates nor migrates the store."


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``show``, ``watch``, ``logs``, ``diff`` and ``programs`` under ``commands``."""
    show = commands.add_parser(
        "show",
        help="a run's events and step runs as a tree (exit code: its status)",
        description="Show a run: its header, then per sequence the events it fired in "
        "firing order and under each the step runs it made ready (status, host, pid, "
        f"attempt, start, duration, log). {_READS_ONLY}",
        epilog=_SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    show.add_argument("--store", help=STORE_HELP)
    show.add_argument("--json", action="store_true", help="print the run as a JSON object")
    show.set_defaults(handler=_show_command, error_prefix=_PREFIX)

    watch = commands.add_parser(
        "watch",
        help="follow a run live until it ends (exit code: its status)",
        description="Follow a run until it ends: a progress bar of its step runs and those "
        "running, refreshed when the store says the run changed (Postgres) or every "
        f"{queries.WATCH_POLL:g}s. Not on a terminal: one line per change. Ctrl-C stops "
        f"watching; the run goes on. {_READS_ONLY}",
        epilog=_WATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    watch.add_argument("--store", help=STORE_HELP)
    watch.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: each change (ended, total, running), then the run",
    )
    watch.set_defaults(handler=_watch_command, error_prefix=_PREFIX)

    logs = commands.add_parser(
        "logs",
        help="print a run's program log or a step's log (-f: follow it)",
        description="Print a run's program.log, or the log of a step run (its latest "
        "recovery and attempt). The log directory is the one the run recorded; a "
        "distributed run's logs are on its agents' hosts: run this there with --log-dir. "
        f"{_READS_ONLY}",
        epilog=_LOGS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logs.add_argument("run_id", metavar="RUN", help="a run id, or a unique prefix of one")
    logs.add_argument(
        "step",
        nargs="?",
        metavar="STEP[.SEQ]",
        help="a step (and sequence, when it ran for several); default: the program log",
    )
    logs.add_argument(
        "-f", "--follow", action="store_true", help="print what is written until the run ends"
    )
    logs.add_argument(
        "--log-dir",
        help="the log_dir the run's Eventor (or agent) wrote to; default: as recorded",
    )
    logs.add_argument("--store", help=STORE_HELP)
    logs.set_defaults(handler=_logs_command, error_prefix=_PREFIX)

    diff = commands.add_parser(
        "diff",
        help="compare two runs' step outcomes and logs (exit 1: they differ)",
        description="Compare two runs: each step run's outcome side by side, then a "
        "unified diff of their logs (program.log and every step log) with timestamps, "
        "pids and run ids taken out. program.log is compared event by event and step by "
        "step, as concurrent steps interleave their lines differently in every run. "
        f"{_READS_ONLY}",
        epilog=_DIFF_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diff.add_argument("first", metavar="RUN1", help="a run id, or a unique prefix of one")
    diff.add_argument("second", metavar="RUN2", help="the run to compare it with")
    diff.add_argument("--log-dir", help="where both runs' logs are; default: as recorded")
    diff.add_argument("--store", help=STORE_HELP)
    diff.add_argument("--json", action="store_true", help="print a JSON object")
    diff.set_defaults(handler=_diff_command, error_prefix=_PREFIX)

    programs = commands.add_parser(
        "programs",
        help="list the programs in a store, with their versions and runs",
        description="List the programs registered in a store: versions, the latest one, "
        f"how many runs and how the newest went. {_READS_ONLY}",
    )
    programs.add_argument("--store", help=STORE_HELP)
    programs.add_argument("--json", action="store_true", help="print a JSON list")
    programs.set_defaults(handler=_programs_command, error_prefix=_PREFIX)


# -- show -------------------------------------------------------------------------------------


def _show_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    details = asyncio.run(queries.run_details(store_from(args.store, environ), args.run_id))
    result = details.result
    if args.json:
        print_json(
            {
                **run_json(result),
                "mode": details.mode,
                "log_dir": None if result.log_dir is None else str(result.log_dir),
                "steps": [_step_json(result, s) for s in result.steps],
                "events": [{"event": e, "sequence": seq} for e, seq in details.events],
                "delays": [
                    {
                        "event": d.event,
                        "sequence": d.sequence,
                        "recovery": d.recovery,
                        "kind": d.kind,
                        "target": d.target,
                        "due": d.due.isoformat(),
                        "done": None if d.done is None else d.done.isoformat(),
                    }
                    for d in details.delays
                ],
                "slots": [
                    {
                        "pool": slot.pool,
                        "step": slot.step,
                        "sequence": slot.sequence,
                        "slots": slot.slots,
                        "held": slot.held,
                    }
                    for slot in details.slots
                ],
            }
        )
    else:
        out = console()
        emit(out, _header(details), *(_sequence_tree(result, seq) for seq in details.sequences))
    return SHOW_EXIT[result.status]


def _step_json(result: RunResult, step: StepRun) -> dict[str, Any]:
    path = result.log_path(step)
    return {**step_json(step), "log": None if path is None else str(path)}


def _header(details: queries.RunDetails) -> Text:
    result = details.result
    text = Text(f"run {result.run_id} of {result.program}: ")
    text.append_text(status_text(result.status))
    lines = [f"created {time_text(result.created)} UTC, "]
    if result.ended is None:
        lines[0] += f"running for {duration_text(result.created, datetime.now(UTC))}"
    else:
        lines[0] += f"duration {duration_text(result.created, result.ended)}"
    if details.mode == "distributed":
        lines[0] += ", distributed"
    if result.reason:
        lines.append(f"reason: {result.reason}")
    if result.log_dir is not None:
        lines.append(f"logs: {result.log_dir}")
    elif details.mode == "distributed":
        lines.append("logs: on the agents' hosts (aeventor logs --log-dir there)")
    for slot in details.slots:
        owner = "the run" if slot.step is None else f"{slot.step}[{slot.sequence}]"
        verb = "holds" if slot.held else "waits for"
        lines.append(f"{owner} {verb} {slot.slots} of {slot.pool}")
    for line in lines:
        text.append("\n  " + line)
    return text


def _sequence_tree(result: RunResult, seq: queries.SequenceTree) -> Tree:
    tree = Tree(Text(f"sequence {seq.sequence}", style="bold"))
    for event in seq.events:
        _add_event(tree, result, event)
    if seq.unreached:
        branch = tree.add(Text("step runs no fired event made ready", style="italic"))
        for node in seq.unreached:
            _add_step(branch, result, node)
    return tree


def _add_event(parent: Tree, result: RunResult, node: queries.EventNode) -> None:
    branch = parent.add(Text(f"event {node.event}", style="cyan"))
    for step in node.steps:
        _add_step(branch, result, step)
    for event in node.events:
        _add_event(branch, result, event)
    for delay in node.pending:
        name = f"{delay.target}[{delay.sequence}]" if delay.kind == "step" else delay.target
        what = name if delay.kind == "step" else f"event {name}"
        branch.add(Text(f"{what} delayed: due {time_text(delay.due)} UTC", style="yellow"))


def _add_step(parent: Tree, result: RunResult, node: queries.StepNode) -> None:
    run = node.run
    label = Text(f"{run.step}[{run.sequence}] ")
    label.append_text(status_text(run.status))
    if run.result is not None:
        label.append(f" -> {run.result!r}")
    facts = [f"attempt {run.attempt}"]
    if run.recovery > 0:
        facts.append(f"recovery {run.recovery}")
    if run.host:
        facts.append(f"on {run.host}")
    if run.pid:
        facts.append(f"pid {run.pid}")
    if run.started is not None:
        facts.append(f"started {time_text(run.started)}")
        if run.ended is None:
            facts.append(f"for {duration_text(run.started, datetime.now(UTC))}")
        else:
            facts.append(duration_text(run.started, run.ended))
    label.append(f"  ({', '.join(facts)})", style="dim")
    branch = parent.add(label)
    if run.error:
        branch.add(Text(run.error.strip().splitlines()[-1], style="red"))
    path = result.log_path(run)
    if path is not None:
        branch.add(Text(f"log: {path}", style="dim"))
    for event in node.events:
        _add_event(branch, result, event)


# -- watch ------------------------------------------------------------------------------------


def _watch_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    store = store_from(args.store, environ)
    seen: list[RunResult] = []
    try:
        asyncio.run(_watch(store, args.run_id, seen, as_json=args.json))
    except KeyboardInterrupt:
        return stopped_watching(seen[-1].run_id if seen else args.run_id)
    final = seen[-1]
    if args.json:
        print(json.dumps({**run_json(final), "steps": [_step_json(final, s) for s in final.steps]}))
        return SHOW_EXIT[final.status]
    line = Text(f"run {final.run_id} of {final.program}: ")
    line.append_text(status_text(final.status))
    line.append(f" after {duration_text(final.created, final.ended)}")
    if final.reason:
        line.append(f" ({final.reason})")
    emit(console(), line)
    return SHOW_EXIT[final.status]


async def _watch(store: str, run_id: str, seen: list[RunResult], *, as_json: bool) -> None:
    out = console()
    async with aclosing(queries.watch(store, run_id)) as snapshots:
        if as_json or not out.is_terminal:
            last: object = None
            async for result in snapshots:
                seen.append(result)
                if result.status is not RunStatus.running:
                    return
                key = _progress_key(result)
                if key != last:
                    last = key
                    if as_json:
                        print(json.dumps(_progress_json(result)))
                    else:
                        emit(out, Text(_progress_line(result)))
                    sys.stdout.flush()
            return
        with Live(console=out, refresh_per_second=4, transient=True) as live:
            async for result in snapshots:
                seen.append(result)
                live.update(_progress_view(result))


_PENDING = (StepStatus.waiting, StepStatus.ready, StepStatus.active)


def _counts(result: RunResult) -> tuple[int, int, list[StepRun]]:
    latest = queries.latest_step_runs(result)
    running = [run for run in latest if run.status is StepStatus.active]
    ended = sum(run.status not in _PENDING for run in latest)
    return ended, len(latest), running


def _progress_key(result: RunResult) -> object:
    ended, total, running = _counts(result)
    return ended, total, [(r.step, r.sequence, r.host, r.pid) for r in running]


def _running_label(run: StepRun) -> str:
    return f"{run.step}[{run.sequence}]"


def _for_how_long(run: StepRun) -> str:
    return duration_text(run.started, datetime.now(UTC))


def _progress_line(result: RunResult) -> str:
    ended, total, running = _counts(result)
    what = ", ".join(
        f"{_running_label(r)}"
        + (f" on {r.host}" if r.host else "")
        + (f" pid {r.pid}" if r.pid else "")
        + f" for {_for_how_long(r)}"
        for r in running
    )
    return f"{ended}/{total} step runs ended; running: {what or 'none'}"


def _progress_json(result: RunResult) -> dict[str, Any]:
    ended, total, running = _counts(result)
    return {
        "run_id": result.run_id,
        "status": result.status.value,
        "ended": ended,
        "total": total,
        "running": [
            {
                "step": r.step,
                "sequence": r.sequence,
                "host": r.host,
                "pid": r.pid,
                "started": None if r.started is None else r.started.isoformat(),
            }
            for r in running
        ],
    }


def _progress_view(result: RunResult) -> RenderableType:
    ended, total, running = _counts(result)
    title = Text(f"run {result.run_id[:SHORT_ID]} of {result.program}  ")
    title.append_text(status_text(result.status))
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(total, 1), completed=ended, width=40),
        Text(f"{ended}/{total} step runs ended"),
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("RUNNING", "HOST", "PID", "FOR"):
        table.add_column(name, no_wrap=True)
    for run in running:
        table.add_row(_running_label(run), run.host or "-", str(run.pid or "-"), _for_how_long(run))
    return Group(title, bar, table)


# -- logs -------------------------------------------------------------------------------------


def _logs_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    store = store_from(args.store, environ)
    try:
        return asyncio.run(_logs(store, args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _logs(store: str, args: argparse.Namespace) -> int:
    log = await queries.log_file(store, args.run_id, args.step, log_dir=args.log_dir)
    if args.follow:
        async with aclosing(queries.follow_log(store, log)) as chunks:
            async for text in chunks:
                sys.stdout.write(text)
                sys.stdout.flush()
        if not await asyncio.to_thread(log.path.is_file):
            raise _missing(log)
        return EXIT_OK
    try:
        text = await asyncio.to_thread(log.path.read_text, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise _missing(log) from None
    sys.stdout.write(text)
    return EXIT_OK


def _missing(log: queries.LogFile) -> ConfigurationError:
    what = "program log" if log.step_run is None else "log"
    if log.step_run is not None:
        what += f" of step run {log.step_run.step}[{log.step_run.sequence}]"
        if log.step_run.status in (StepStatus.skipped, StepStatus.ready, StepStatus.waiting):
            what += f" ({log.step_run.status.value}: it never started)"
    return ConfigurationError(
        f"no {what} at {str(log.path)!r}; if the run's logs were moved, pass --log-dir DIR"
    )


# -- diff -------------------------------------------------------------------------------------


def _diff_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    store = store_from(args.store, environ)
    found = asyncio.run(queries.diff_runs(store, args.first, args.second, log_dir=args.log_dir))
    code = EXIT_RUNS_DIFFER if found.differs else EXIT_OK
    if args.json:
        print_json(
            {
                "differs": found.differs,
                "first": run_json(found.first),
                "second": run_json(found.second),
                "steps": [
                    {
                        "step": s.step,
                        "sequence": s.sequence,
                        "first": None if s.first is None else s.first.value,
                        "second": None if s.second is None else s.second.value,
                        "differs": s.differs,
                    }
                    for s in found.steps
                ],
                "logs": {name: list(lines) for name, lines in found.logs},
                "logs_missing": found.logs_missing,
            }
        )
        return code
    out = console()
    for side, run in (("a", found.first), ("b", found.second)):
        line = Text(f"{side}: run {run.run_id} of {run.program}: ")
        line.append_text(status_text(run.status))
        emit(out, line)
    rows: list[list[str | Text]] = [
        [
            f"{s.step}[{s.sequence}]",
            status_text(s.first),
            status_text(s.second),
            Text("differs", style="bold") if s.differs else Text(""),
        ]
        for s in found.steps
    ]
    print_table(out, ["STEP", "A", "B", ""], rows)
    if found.logs_missing:
        emit(out, Text(f"logs not compared: {found.logs_missing}", style="yellow"))
    for _, lines in found.logs:
        emit(out, Group(*(_diff_line(line) for line in lines)))
    if not found.differs:
        emit(out, Text("no differences"))
    return code


def _diff_line(line: str) -> Text:
    if line.startswith(("+++", "---")):
        return Text(line, style="bold")
    if line.startswith("@@"):
        return Text(line, style="cyan")
    if line.startswith("+"):
        return Text(line, style="green")
    if line.startswith("-"):
        return Text(line, style="red")
    return Text(line)


# -- programs ---------------------------------------------------------------------------------


def _programs_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    found = asyncio.run(queries.programs(store_from(args.store, environ)))
    if args.json:
        print_json(
            [
                {
                    "name": p.name,
                    "versions": p.versions,
                    "latest_version": p.latest_version,
                    "registered": p.registered.isoformat(),
                    "runs": p.runs,
                    "last_run_id": p.last_run_id,
                    "last_status": None if p.last_status is None else p.last_status.value,
                    "last_run": None if p.last_run is None else p.last_run.isoformat(),
                }
                for p in found
            ]
        )
        return EXIT_OK
    rows: list[list[str | Text]] = [
        [
            p.name,
            str(p.versions),
            p.latest_version[:SHORT_ID],
            time_text(p.registered),
            str(p.runs),
            status_text(p.last_status),
            time_text(p.last_run),
        ]
        for p in found
    ]
    header = ["PROGRAM", "VERSIONS", "LATEST", "REGISTERED (UTC)", "RUNS", "LAST RUN", "AT (UTC)"]
    print_table(console(), header, rows)
    return EXIT_OK
