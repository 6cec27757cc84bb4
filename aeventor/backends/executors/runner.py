"""The process that runs one step: ``python -m aeventor.backends.executors.runner`` with a JSON spec on stdin.

It imports the step's callable by path, calls it with the JSON arguments, and writes
``{"ok": true, "value": ...}`` or ``{"ok": false, "error": "..."}`` to the result file the
spec names. Its stdout and stderr are the step's log file; the root logger writes there too.

A function defined in the user's ``__main__`` script is found by loading that script by path
under another module name (as multiprocessing's spawn does), so code under
``if __name__ == "__main__":`` does not run again. A script that runs the program at module
level without that guard is stopped at the ``run()`` call:
if the function was defined above the call, the step still works (see ``_guard``).

``--lifeline FD`` names the read end of the step's lifeline (see :mod:`._lifeline`): the
runner arms it before it loads anything, so the step's process group dies with the worker.
Over SSH, ``--lifeline 0`` makes the channel's stdin the lifeline: the spec is then read
as its first line, and the channel closing (the agent or its connection gone) ends the step.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import traceback
from typing import Any

from ...exceptions import UnguardedMainError
from ...guard import MainImportStopped, importing_main
from . import _lifeline

__all__ = ("main", "run_spec")

MAIN_MODULE = "__aeventor_main__"
#: The largest outcome :func:`run_prepared` sends through a result pipe instead of the
#: result file: one write no larger than a pipe's smallest capacity (a page) never blocks
#: on a pipe nobody reads until the process exited, and is atomic.
PIPE_RESULT_MAX = 4096


def _setup_logging(deterministic: bool, level: int) -> None:
    """The step's log records go to stderr (its log file) at the run's level: the root
    logger's and the step logger's (``EVENTOR_LOGGER_NAME``)."""
    # As aeventor.dispatch.logs.step_format (not imported: this process starts lean).
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if deterministic
        else "%(asctime)s %(levelname)s %(name)s [pid=%(process)d]: %(message)s"
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    step_logger = os.environ.get("EVENTOR_LOGGER_NAME")
    if step_logger:
        logging.getLogger(step_logger).setLevel(level)


def _load_main(path: str, qualname: str, step: str) -> Any:
    spec = importlib.util.spec_from_file_location(MAIN_MODULE, path)
    if spec is None or spec.loader is None:
        raise UnguardedMainError(f"step {step!r}: cannot load script {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MAIN_MODULE] = module
    token = importing_main.set(path)
    stopped = False
    try:
        spec.loader.exec_module(module)
    except MainImportStopped:
        stopped = True
    finally:
        importing_main.reset(token)
    try:
        return _resolve(module, qualname)
    except AttributeError:
        if stopped:
            raise UnguardedMainError(
                f"step {step!r}: script {path!r} starts the run at import time (module-level "
                f"code calls run(), start() or run_sync()) before it defines {qualname!r}. "
                'Put that code under `if __name__ == "__main__":` at the end of the script.'
            ) from None
        raise
    finally:
        if stopped:
            logging.getLogger("aeventor").warning(
                "script %s starts the run at import time; put that code under "
                'if __name__ == "__main__": so steps do not execute it',
                path,
            )


def _resolve(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load(target: str, main_path: str | None, step: str) -> Any:
    module_name, _, qualname = target.partition(":")
    if main_path is not None:
        script_dir = os.path.dirname(os.path.abspath(main_path))
        if script_dir not in sys.path:
            sys.path.insert(0, script_dir)
        return _load_main(main_path, qualname, step)
    return _resolve(importlib.import_module(module_name), qualname)


def _execute(spec: dict[str, Any], func: Any = None) -> dict[str, Any]:
    step = spec["step"]
    try:
        if func is None:
            func = _load(spec["target"], spec.get("main_path"), step)
        kwargs = dict(spec["kwargs"])
        if spec.get("sequence_arg_name"):
            kwargs[spec["sequence_arg_name"]] = os.environ["EVENTOR_STEP_SEQUENCE"]
        if spec.get("pass_logger"):
            kwargs["logger"] = logging.getLogger(os.environ["EVENTOR_LOGGER_NAME"])
        value = func(*spec["args"], **kwargs)
        if hasattr(value, "__await__"):
            # Imported only here: asyncio costs a third of this process's start-up.
            import asyncio

            value = asyncio.run(_await(value))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"ok": False, "error": "".join(traceback.format_exception(exc)).rstrip()}
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return {
            "ok": False,
            "error": (
                f"SerializationError: step {step!r} returned {type(value).__name__} "
                f"({exc}); return only JSON values (str, int, float, bool, None, lists, "
                "dicts with string keys)"
            ),
        }
    return {"ok": True, "value": value}


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _lead_session(pid_path: str) -> None:
    """Lead a session of our own and record our pid, so ``kill -- -PID`` reaches every child.

    Used by launchers that cannot start us in a new session themselves (over SSH). The pid
    file is replaced atomically: a reader never sees it half-written.
    """
    if os.getsid(0) != os.getpid():
        try:
            os.setsid()
        except PermissionError:
            # Already a process group leader (not of a session): the group id is our pid.
            pass
    tmp = f"{pid_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(f"{os.getpid()}\n")
    os.replace(tmp, pid_path)


def _lifeline_fd(argv: list[str]) -> int | None:
    if len(argv) == 2 and argv[0] == "--lifeline":
        return int(argv[1])
    if argv:
        raise SystemExit(f"usage: {__spec__.name if __spec__ else 'runner'} [--lifeline FD]")
    return None


def main() -> int:
    lifeline = lifeline_arg = _lifeline_fd(sys.argv[1:])
    if lifeline == 0:
        # The lifeline is stdin, kept open after the spec: one line of JSON.
        spec = json.loads(sys.stdin.buffer.readline())
        lifeline = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    else:
        spec = json.loads(sys.stdin.read())
    if spec.get("pid_path"):
        _lead_session(spec["pid_path"])
    if lifeline is not None:
        # Over SSH (stdin), the channel closes as the step ends: no end byte can come.
        _lifeline.hold(lifeline, ended_by_byte=lifeline_arg != 0)
    for entry in reversed(spec.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    return run_spec(spec)


def run_spec(spec: dict[str, Any], func: Any = None) -> int:
    """Run the step ``spec`` describes in this process, write its outcome to its result
    file, and return the exit status (0: it succeeded).

    Args:
        func: the step's callable, already loaded (by the warm pool's zygote, see
            :mod:`._zygote`); None: it is loaded here, by path.
    """
    prepare(spec)
    return run_prepared(spec, func)


def prepare(spec: dict[str, Any]) -> None:
    """What :func:`run_spec` sets up before it runs the step: ``sys.argv`` and logging
    (nothing of the step's own code runs here)."""
    if spec.get("main_path") and spec.get("argv"):
        sys.argv = list(spec["argv"])
    _setup_logging(bool(spec.get("deterministic_logs")), int(spec.get("log_level", logging.INFO)))


def run_prepared(spec: dict[str, Any], func: Any = None, *, result_fd: int | None = None) -> int:
    """:func:`run_spec` once :func:`prepare` ran.

    Args:
        result_fd: the write end of an empty pipe (the warm pool's zygote reads it once this
            process exited): a small outcome is written there rather than to the result
            file (whose creation costs more than the rest of a short step's end).
    """
    # Known before the step runs: should it close the descriptor and open another that
    # gets its number, the outcome must not go there.
    pipe = None if result_fd is None else _identity(result_fd)
    outcome = _execute(spec, func)
    if not outcome["ok"]:
        print(outcome["error"], file=sys.stderr)  # noqa: T201 - the step's log is stderr
    sys.stdout.flush()
    sys.stderr.flush()
    data = json.dumps(outcome).encode()
    if not (
        result_fd is not None
        and pipe is not None
        and len(data) <= PIPE_RESULT_MAX
        and _identity(result_fd) == pipe
        and _write_all(result_fd, data)
    ):
        with open(spec["result_path"], "wb") as fh:
            fh.write(data)
    return 0 if outcome["ok"] else 1


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _write_all(fd: int, data: bytes) -> bool:
    try:
        return os.write(fd, data) == len(data)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
