"""``aeventor agent`` (also ``python -m aeventor.agent``) and ``aeventor agent start``.

``aeventor agent --store STORE ...`` runs this host's agent until SIGTERM or SIGINT (see
:mod:`aeventor.agent`); ``aeventor agent start --host NAME [--ssh ADDRESS] -- AGENT ARGS``
starts one on another host over SSH, detached, and prints its pid there.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..context import DEFAULT_PASS_ENV, SECRET_ENV
from ..exceptions import ConfigurationError
from ..logs import get_logger, stderr_handler
from . import STORE_ENV

__all__ = ("add_parsers", "parse_ssh_host", "start_remote")

log = get_logger("aeventor.agent")

_USAGE = (
    "%(prog)s --store STORE [--host NAME] [--allow PATTERN] [options]\n"
    "       %(prog)s start --host NAME [--ssh [USER@]ADDRESS[:PORT]] [options] -- AGENT OPTIONS"
)


def _log_level(text: str) -> int:
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a level name: DEBUG, INFO, WARNING or ERROR"
        )
    return level


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``agent`` (and its ``start`` subcommand) under ``commands``."""
    parser = commands.add_parser(
        "agent",
        help="run this host's agent (agent start: over SSH)",
        usage=_USAGE,
        description=(
            "Run the aeventor agent of this host until SIGTERM or SIGINT; "
            "`aeventor agent start` starts one on another host over SSH instead."
        ),
        # The options of `agent start` (--ssh) must not read as abbreviations of ours
        # (--ssh-host, --ssh-python): argparse matches prefixes before it finds `start`.
        allow_abbrev=False,
    )
    # Not required by argparse: `agent start` takes none of these (checked in _agent_command).
    parser.add_argument(
        "--store",
        action="append",
        help="URL, sqlite path or store name to serve (repeatable; default: $AEVENTOR_STORE)",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name served locally (repeatable; default: this machine's host name)",
    )
    parser.add_argument(
        "--ssh-host",
        action="append",
        default=[],
        metavar="NAME=[USER@]ADDRESS[:PORT]",
        help="a host served over SSH (repeatable)",
    )
    parser.add_argument("--known-hosts", help="known_hosts file for SSH hosts")
    parser.add_argument("--client-key", action="append", default=None, help="SSH key file")
    parser.add_argument("--ssh-python", default=sys.executable, help="remote python")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        help=(
            "fnmatch pattern of the modules, script paths and commands (argv[0]) whose "
            "steps may run (repeatable)"
        ),
    )
    parser.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="PATTERN",
        help=(
            "fnmatch pattern of this agent's environment variables its steps inherit "
            "(repeatable; sent to SSH hosts too). Without it, local steps inherit only "
            f"{' '.join(DEFAULT_PASS_ENV)}; never {', '.join(sorted(SECRET_ENV))}"
        ),
    )
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--log-dir", type=Path, default=Path.cwd() / "aeventor_logs")
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=logging.INFO,
        metavar="LEVEL",
        help="level of the runs' program logs and of the steps' loggers: DEBUG, INFO "
        "(default), WARNING, ERROR",
    )
    parser.add_argument("--json-logs", action="store_true", help="log JSON lines")
    parser.set_defaults(handler=_agent_command, error_prefix="aeventor agent")

    subcommands = parser.add_subparsers(
        title="commands", dest="agent_command", required=False, metavar="COMMAND"
    )
    start = subcommands.add_parser(
        "start",
        # Named here: argparse would derive it from our usage, which is custom.
        prog=f"{parser.prog} start",
        help="start an agent on another host over SSH",
        description="Start an agent on another host over SSH; arguments after -- go to it.",
    )
    start.add_argument(
        "--host",
        help="the host name the agent serves (passed to it as --host); also the SSH "
        "destination when --ssh is not given",
    )
    start.add_argument(
        "--ssh", metavar="[USER@]ADDRESS[:PORT]", help="where to reach it (default: --host)"
    )
    start.add_argument("--known-hosts")
    start.add_argument("--client-key", action="append", default=None)
    start.add_argument("--python", default=sys.executable, help="python on that host")
    start.add_argument(
        "--forward-env",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "pass this environment variable to the agent (repeatable; sent over the SSH "
            "channel, never on a command line)"
        ),
    )
    start.add_argument("--log", help="the agent's log file there")
    start.add_argument("agent_args", nargs=argparse.REMAINDER)
    start.set_defaults(handler=_start_command, error_prefix="aeventor agent start")


def parse_ssh_host(spec: str, args: argparse.Namespace) -> tuple[str, Any]:
    from ..backends.executors.ssh import SshTarget

    name, sep, address = spec.partition("=")
    if not sep or not name or not address:
        raise ConfigurationError(
            f"--ssh-host {spec!r}: write it as NAME=[USER@]ADDRESS[:PORT], e.g. s2=root@10.0.0.2"
        )
    user, _, hostport = address.rpartition("@")
    host, _, port = hostport.partition(":")
    return name, SshTarget(
        host=host,
        port=int(port) if port else 22,
        user=user or None,
        client_keys=args.client_key,
        known_hosts=args.known_hosts,
        python=args.ssh_python,
    )


# -- aeventor agent ---------------------------------------------------------------------------


def _configure_logging(json_lines: bool) -> None:
    # The library logs to the standard library's "aeventor.*" loggers; the program decides
    # where they go: stderr, as console lines or JSON lines.
    handler = stderr_handler(json_lines=json_lines, colors=sys.stderr.isatty())
    logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)
    # Alembic announces each plugin it loads at INFO when the migrations are imported.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _agent_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if not args.store:
        if not environ.get(STORE_ENV):
            raise ConfigurationError(
                "no store: name the store(s) this agent serves with --store STORE "
                f"(repeatable) or set ${STORE_ENV}"
            )
        args.store = [environ[STORE_ENV]]
    _configure_logging(args.json_logs)
    asyncio.run(_serve(args, environ))
    return 0


async def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    from ..agent import AgentConfig, run_agents
    from ..signing import load_cluster_key

    ssh_targets = dict(parse_ssh_host(spec, args) for spec in args.ssh_host)
    config = AgentConfig(
        hosts=args.host
        if args.host is not None
        else ([] if ssh_targets else [socket.gethostname()]),
        cluster_key=load_cluster_key(environ=environ),
        allow=args.allow,
        pass_env=args.pass_env,
        ssh_targets=ssh_targets,
        max_concurrency=args.max_concurrency,
        heartbeat=args.heartbeat,
        lease=args.lease,
        grace=args.grace,
        log_dir=args.log_dir,
        log_level=args.log_level,
    )
    if not config.allow:
        log.warning(
            "agent.nothing_allowed",
            hint="no --allow pattern: every step will be refused; pass --allow 'mypkg.*'",
        )
    for pattern in args.pass_env:
        secrets = sorted(name for name in SECRET_ENV if fnmatch.fnmatchcase(name, pattern))
        if secrets:
            log.warning(
                "agent.secret_not_passed",
                pattern=pattern,
                hint=f"steps never inherit {', '.join(secrets)}, whatever --pass-env says",
            )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_agents(args.store, config, stop)


# -- aeventor agent start ---------------------------------------------------------------------


#: Run by the remote ``python`` (standard library only): reads the forwarded variables as a
#: JSON line on stdin, starts the agent detached (a session of its own, output to the log
#: file), prints its pid. The variables travel on the channel's stdin, never on a command
#: line, which any user of the host can read in its process list (the cluster key among them).
_LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "env = {**os.environ, **json.loads(sys.stdin.readline() or '{}')}\n"
    "with open(sys.argv[1], 'wb') as log:\n"
    "    agent = subprocess.Popen(sys.argv[2:], env=env, stdin=subprocess.DEVNULL,\n"
    "                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)\n"
    "print(f'aeventor-agent-pid={agent.pid}', flush=True)\n"
)


async def start_remote(
    target: Any, agent_args: Sequence[str], *, env: Mapping[str, str], log_file: str
) -> int:
    """Start ``python -m aeventor.agent`` on an SSH host, detached; return its pid there.

    ``env`` is sent over the channel's stdin, so no value (a cluster key) shows in the
    remote host's process list.
    """
    import json
    import shlex

    from ..backends.executors.ssh import SshExecutor

    executor = SshExecutor(targets={"target": target})
    try:
        python = shlex.quote(target.python)
        command = " ".join(
            [python, "-c", shlex.quote(_LAUNCHER), shlex.quote(log_file)]
            + [python, "-m", "aeventor.agent"]
            + [shlex.quote(a) for a in agent_args]
        )
        status, out, err = await executor.shell(
            "target", command, input=json.dumps(dict(env)).encode() + b"\n"
        )
        if status != 0:
            raise ConfigurationError(f"starting the agent over SSH failed ({status}): {err}")
        # Found by its tag: SshExecutor.shell() returns str(bytes) ("b'123\\n'"), not text.
        found = re.search(r"aeventor-agent-pid=(\d+)", out)
        if found is None:
            raise ConfigurationError(
                f"the agent was started over SSH, but its pid is not in the output: {out!r}"
            )
        return int(found.group(1))
    finally:
        await executor.aclose()


def _start_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    agent_args = [a for a in args.agent_args if a != "--"] if args.agent_args else []
    if args.host is None and args.ssh is None:
        raise ConfigurationError(
            "name the host with --host NAME (and --ssh ADDRESS if NAME does not resolve)"
        )
    if args.host is not None:
        agent_args = ["--host", args.host, *agent_args]
    destination = args.ssh or args.host
    _, target = parse_ssh_host(
        f"target={destination}",
        argparse.Namespace(
            client_key=args.client_key, known_hosts=args.known_hosts, ssh_python=args.python
        ),
    )
    env = {name: environ[name] for name in args.forward_env if name in environ}
    log_file = args.log or f"/tmp/aeventor-agent-{os.getpid()}.log"
    pid = asyncio.run(start_remote(target, agent_args, env=env, log_file=log_file))
    print(f"agent started on {destination}: pid {pid}, log {log_file}")
    return 0
