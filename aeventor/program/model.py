"""A program's definition as data: events, steps, associations and triggers.

The definition is what the engine stores, hashes into a version and compares; the live
callables it names are resolved again by import path wherever a step runs. Nothing here does
I/O (importing a module to check a callable's path aside, which the user's script has already
done).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..exceptions import ProgramDefinitionError, SerializationError
from . import expr as _expr

__all__ = (
    "POOL_SCOPES",
    "TRIGGER_STATUSES",
    "EventDef",
    "GroupDef",
    "PoolDef",
    "ProgramDef",
    "Retry",
    "RunStatus",
    "StepDef",
    "StepStatus",
    "callable_target",
    "check_json",
)


class StepStatus(StrEnum):
    """Status of a step run; the first five may key a step's ``triggers``.

    ``complete`` is never stored: it stands for success or failure in ``triggers``.

    .. versionadded:: 0.1
    """

    ready = "ready"
    active = "active"
    success = "success"
    failure = "failure"
    complete = "complete"
    #: Not started: the run stopped (a failure with no failure trigger) before it could.
    skipped = "skipped"
    #: Terminated or never started because the run was cancelled.
    cancelled = "cancelled"
    #: Made ready, waiting for the slots of its pools and limits (``acquires``,
    #: ``max_concurrent``); it becomes ``ready`` once it holds all of them.
    waiting = "waiting"
    #: Its worker died or hung past its lease while it ran; its failure triggers fire.
    lost = "lost"


#: The statuses a step's ``triggers`` may name.
TRIGGER_STATUSES = frozenset(
    {
        StepStatus.ready,
        StepStatus.active,
        StepStatus.success,
        StepStatus.failure,
        StepStatus.complete,
    }
)


class RunStatus(StrEnum):
    """Status of a run.

    .. versionadded:: 0.1
    """

    running = "running"
    success = "success"
    failure = "failure"
    cancelled = "cancelled"


#: How a step runs: ``warm`` (a process forked by the executor's warm pool, which imported
#: the function by path; the default for a plain function), ``process`` (a fresh interpreter
#: importing the function by path), ``inloop`` (an ``async def`` awaited in the engine's own
#: loop) or ``command`` (an argv, no Python). On an SSH host, ``warm`` runs as ``process``.
EXECUTORS = frozenset({"warm", "process", "inloop", "command"})
#: The executors of a function that runs in a process of its own (local or on an SSH host).
PROCESS_EXECUTORS = frozenset({"warm", "process"})


@dataclass(frozen=True, slots=True)
class EventDef:
    name: str
    expr: _expr.Expr | None = None


@dataclass(frozen=True, slots=True)
class GroupDef:
    """Properties shared by the steps that are members of a group."""

    name: str
    host: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    #: At most this many step runs of the group's steps at once in a run (None: no limit).
    max_concurrent: int | None = None


#: Where a pool's slots are counted: ``program`` (each run has its own), ``local`` (one pool
#: per host, shared by every run there), ``cluster`` (one pool for every host).
POOL_SCOPES = ("program", "local", "cluster")


@dataclass(frozen=True, slots=True)
class PoolDef:
    """A counted pool of slots that steps acquire (``ev.add_pool``)."""

    name: str
    size: int
    scope: str = "program"


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failed step run is tried again (``add_step(..., retry=Retry(...))``).

    A failure the policy retries records its attempt as failed, fires nothing, and makes the
    next attempt ready after a backoff; the step's failure triggers fire only when the last
    attempt fails. Every attempt has its own step run and its own log file.

    Args:
        attempts: how many attempts in all (1: no retry).
        backoff: seconds before the second attempt.
        exponential: double the backoff at each further attempt (else it stays fixed).
        cap: the most seconds between two attempts.
        jitter: a fraction (0 to 1) of each backoff taken off at random, so that steps that
            failed together do not all retry at the same instant.
        on: which failures are retried (None: all): exit codes of command steps (ints),
            exception type names (``"TimeoutError"``, ``"ConnectionError"``, or a dotted
            ``"module.Error"``), and ``"lost"`` (the step's worker died while it ran). The
            step's timeout is the ``TimeoutError`` of its attempt.

    Raises:
        ProgramDefinitionError: a value out of range, with the fix.

    .. versionadded:: 0.1
    """

    attempts: int = 3
    backoff: float = 1.0
    exponential: bool = True
    cap: float = 300.0
    jitter: float = 0.0
    on: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> ProgramDefinitionError:
            return ProgramDefinitionError(f"Retry({what}): {fix}")

        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise bad(f"attempts={self.attempts!r}", "give a whole number of attempts, 1 or more")
        if self.attempts < 1:
            raise bad(f"attempts={self.attempts}", "give 1 or more (1: no retry)")
        for name in ("backoff", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(f"{name}={value!r}", "give seconds, 0 or more")
            if not 0 <= value < math.inf:
                raise bad(f"{name}={value!r}", "give seconds, 0 or more")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise bad(f"jitter={self.jitter!r}", "give a fraction from 0 to 1")
        if self.on is not None:
            on = (self.on,) if isinstance(self.on, int | str) else tuple(self.on)
            for item in on:
                if isinstance(item, bool) or not isinstance(item, int | str) or item == "":
                    raise bad(
                        f"on={self.on!r}",
                        "give exit codes (int), exception type names (str) and/or 'lost'",
                    )
            object.__setattr__(self, "on", on)

    def delay(self, attempt: int, draw: float = 0.0) -> float:
        """Seconds to wait after attempt ``attempt`` failed; ``draw`` (0 to 1) picks the
        jitter (the worker draws it at random)."""
        base = self.backoff * (2 ** (attempt - 1) if self.exponential else 1)
        return min(base, self.cap) * (1 - self.jitter * draw)

    def retries(
        self, attempt: int, status: StepStatus, *, exit_code: int | None, error: str | None
    ) -> bool:
        """Whether attempt ``attempt``, ended with ``status``, is tried again."""
        if attempt >= self.attempts or status not in (StepStatus.failure, StepStatus.lost):
            return False
        if self.on is None:
            return True
        if status is StepStatus.lost:
            return "lost" in self.on
        if exit_code is not None and exit_code in self.on:
            return True
        kind = _error_type(error)
        return kind is not None and any(
            isinstance(item, str) and (kind == item or kind.rsplit(".", 1)[-1] == item)
            for item in self.on
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "backoff": self.backoff,
            "exponential": self.exponential,
            "cap": self.cap,
            "jitter": self.jitter,
            "on": None if self.on is None else list(self.on),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Retry:
        on = data.get("on")
        return cls(
            attempts=data["attempts"],
            backoff=data["backoff"],
            exponential=data["exponential"],
            cap=data["cap"],
            jitter=data["jitter"],
            on=None if on is None else tuple(on),
        )


def _error_type(error: str | None) -> str | None:
    """The exception type a step's recorded error names: its last line's ``Type: ...``."""
    if not error:
        return None
    last = error.strip().splitlines()[-1]
    kind = last.partition(":")[0].strip()
    return kind if kind and " " not in kind else None


@dataclass(frozen=True, slots=True)
class StepDef:
    """One step. ``target`` is ``module:qualname`` for functions, None for no-ops."""

    name: str
    executor: str
    target: str | None = None
    main_path: str | None = None
    argv: tuple[str, ...] | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    triggers: Mapping[StepStatus, tuple[str, ...]] = field(default_factory=dict)
    host: str | None = None
    sequence_arg_name: str | None = None
    #: True for in-loop callables that cannot be imported by path (closures): such a step
    #: runs only in the process that defined it.
    local_only: bool = False
    group: str | None = None
    #: Extra environment variables of the step (its group's, then its own).
    env: Mapping[str, str] = field(default_factory=dict)
    #: What recovering its run does with a step run of it that did not succeed (failed,
    #: lost, cancelled or skipped): ``"rerun"`` it, or ``"skip"`` it (keep its outcome).
    recovery: str = "rerun"
    #: Seconds a run of the step may take; then it is terminated (its whole process group:
    #: SIGTERM, SIGKILL after a grace period) and fails with a timeout error.
    timeout: float | None = None
    #: How failed runs of the step are tried again (None: they are not).
    retry: Retry | None = None
    #: Whether an unhandled failure of this step stops the run (None: the program's
    #: ``stop_on_exception``); the original's per-step config key.
    stop_on_exception: bool | None = None
    #: Call the step's function with ``logger=`` its step logger (the original's
    #: ``pass_logger_to_task``).
    pass_logger: bool = False
    #: ``(pool, slots)`` taken all at once before a run of the step starts.
    acquires: tuple[tuple[str, int], ...] = ()
    #: ``(pool, slots)`` given back when a run of it ends (None: what it acquired).
    releases: tuple[tuple[str, int], ...] | None = None
    #: At most this many runs of the step at once in a run, across its sequences.
    max_concurrent: int | None = None
    #: Among step runs waiting for the same slots, higher priorities go first (then FIFO).
    priority: int = 0


@dataclass(frozen=True, slots=True)
class ProgramDef:
    """A whole program as data. ``assocs`` maps an event to the steps and events it fans out to.

    Each assoc target is ``("step", name)`` or ``("event", name)``. ``delays`` holds the
    associations made with a delay: an event to ``(kind, name, seconds)`` targets, reached
    that many seconds after the event fired.
    """

    name: str
    events: Mapping[str, EventDef]
    steps: Mapping[str, StepDef]
    assocs: Mapping[str, tuple[tuple[str, str], ...]]
    stop_on_exception: bool = True
    groups: Mapping[str, GroupDef] = field(default_factory=dict)
    delays: Mapping[str, tuple[tuple[str, str, float], ...]] = field(default_factory=dict)
    pools: Mapping[str, PoolDef] = field(default_factory=dict)
    #: At most this many step runs of a run at once, across agents (distributed runs; a
    #: standalone run's worker applies ``max_concurrency`` itself).
    max_concurrent: int | None = None
    #: At most this many step runs at once on each host, across every run that says so.
    host_max_concurrent: int | None = None

    def targets(self, event: str) -> Iterator[tuple[str, str]]:
        """Every ``(kind, name)`` the event leads to, at once or after a delay."""
        yield from self.assocs.get(event, ())
        for kind, target, _ in self.delays.get(event, ()):
            yield kind, target

    def validate(self) -> None:
        """Check every reference; raise :class:`ProgramDefinitionError` naming the first bad one."""
        for event in self.events.values():
            if event.expr is None:
                continue
            for ref in _expr.names(event.expr):
                if ref == event.name:
                    raise ProgramDefinitionError(
                        f"event {event.name!r}: its expression refers to itself; "
                        "an expression may only use other events"
                    )
                if ref not in self.events:
                    raise ProgramDefinitionError(
                        f"event {event.name!r}: its expression {_expr.render(event.expr)} "
                        f"uses undefined event {ref!r}; define it first with "
                        f"ev.add_event({ref!r})"
                    )
        every = {e: list(ts) for e, ts in self.assocs.items()}
        for event_name, delayed in self.delays.items():
            every.setdefault(event_name, []).extend((k, t) for k, t, _ in delayed)
        for event_name, targets in every.items():
            if event_name not in self.events:
                raise ProgramDefinitionError(
                    f"add_assoc: undefined event {event_name!r}; define it with "
                    f"ev.add_event({event_name!r})"
                )
            for kind, target in targets:
                table: Mapping[str, object] = self.steps if kind == "step" else self.events
                if target not in table:
                    raise ProgramDefinitionError(
                        f"add_assoc({event_name!r}, ...): undefined {kind} {target!r}; "
                        f"define it with ev.add_{kind}({target!r}, ...)"
                    )
        for step in self.steps.values():
            for what, wanted in (("acquires", step.acquires), ("releases", step.releases or ())):
                for pool_name, slots in wanted:
                    pool = self.pools.get(pool_name)
                    if pool is None:
                        raise ProgramDefinitionError(
                            f"step {step.name!r}: {what} names undefined pool {pool_name!r}; "
                            f"define it with ev.add_pool({pool_name!r}, size)"
                        )
                    if what == "acquires" and slots > pool.size:
                        raise ProgramDefinitionError(
                            f"step {step.name!r}: acquires {slots} slots of pool "
                            f"{pool_name!r}, which has {pool.size}: it could never start; "
                            "ask for fewer or make the pool larger"
                        )
            if step.group is not None and step.group not in self.groups:
                raise ProgramDefinitionError(
                    f"step {step.name!r}: undefined group {step.group!r}; define it with "
                    f"ev.add_group({step.group!r}, ...)"
                )
            for status, fired in step.triggers.items():
                for event_name in fired:
                    if event_name not in self.events:
                        raise ProgramDefinitionError(
                            f"step {step.name!r}: triggers[{status.value}] names undefined "
                            f"event {event_name!r}; define it with ev.add_event({event_name!r})"
                        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready, canonical form (sorted), from which :meth:`version` is hashed."""
        plain: dict[str, Any] = _plain(self._json_fields())
        return plain

    def _json_fields(self) -> dict[str, Any]:
        """:meth:`to_json` with its long lists left as :class:`_Each` (made one item at a
        time)."""
        return {
            "name": self.name,
            "stop_on_exception": self.stop_on_exception,
            "events": _Each(_event_json, sorted(self.events.values(), key=lambda e: e.name)),
            "steps": _Each(_step_json, sorted(self.steps.values(), key=lambda s: s.name)),
            "groups": [
                {
                    "name": g.name,
                    "host": g.host,
                    "env": dict(g.env),
                    "config": dict(g.config),
                    **({} if g.max_concurrent is None else {"max_concurrent": g.max_concurrent}),
                }
                for g in sorted(self.groups.values(), key=lambda g: g.name)
            ],
            "assocs": {k: _Each(list, v) for k, v in sorted(self.assocs.items())},
            # Only when there are some: programs defined before delays keep their version.
            **(
                {"delays": {k: [list(t) for t in v] for k, v in sorted(self.delays.items())}}
                if self.delays
                else {}
            ),
            **(
                {
                    "pools": [
                        {"name": p.name, "size": p.size, "scope": p.scope}
                        for p in sorted(self.pools.values(), key=lambda p: p.name)
                    ]
                }
                if self.pools
                else {}
            ),
            **({} if self.max_concurrent is None else {"max_concurrent": self.max_concurrent}),
            **(
                {}
                if self.host_max_concurrent is None
                else {"host_max_concurrent": self.host_max_concurrent}
            ),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProgramDef:
        """Inverse of :meth:`to_json`."""
        events = {
            e["name"]: EventDef(
                e["name"], None if e["expr"] is None else _expr.from_json(e["expr"])
            )
            for e in data["events"]
        }
        steps = {
            s["name"]: StepDef(
                name=s["name"],
                executor=s["executor"],
                target=s["target"],
                main_path=s["main_path"],
                argv=None if s["argv"] is None else tuple(s["argv"]),
                args=tuple(s["args"]),
                kwargs=dict(s["kwargs"]),
                triggers={StepStatus(k): tuple(v) for k, v in s["triggers"].items()},
                host=s["host"],
                sequence_arg_name=s["sequence_arg_name"],
                local_only=s["local_only"],
                group=s.get("group"),
                env=dict(s.get("env", {})),
                recovery=s.get("recovery", "rerun"),
                timeout=s.get("timeout"),
                retry=None if s.get("retry") is None else Retry.from_json(s["retry"]),
                stop_on_exception=s.get("stop_on_exception"),
                pass_logger=s.get("pass_logger", False),
                acquires=tuple((a[0], int(a[1])) for a in s.get("acquires", ())),
                releases=(
                    None
                    if s.get("releases") is None
                    else tuple((r[0], int(r[1])) for r in s["releases"])
                ),
                max_concurrent=s.get("max_concurrent"),
                priority=s.get("priority", 0),
            )
            for s in data["steps"]
        }
        groups = {
            g["name"]: GroupDef(
                g["name"], g["host"], dict(g["env"]), dict(g["config"]), g.get("max_concurrent")
            )
            for g in data.get("groups", [])
        }
        assocs = {k: tuple((t[0], t[1]) for t in v) for k, v in data["assocs"].items()}
        delays = {
            k: tuple((t[0], t[1], float(t[2])) for t in v)
            for k, v in data.get("delays", {}).items()
        }
        return cls(
            name=data["name"],
            events=events,
            steps=steps,
            assocs=assocs,
            delays=delays,
            stop_on_exception=data["stop_on_exception"],
            groups=groups,
            pools={
                p["name"]: PoolDef(p["name"], int(p["size"]), p["scope"])
                for p in data.get("pools", [])
            },
            max_concurrent=data.get("max_concurrent"),
            host_max_concurrent=data.get("host_max_concurrent"),
        )

    def canonical_json(self) -> str:
        """``json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))``, built one
        step (event, association) at a time: the definition of a program of many steps is
        never held whole as a tree of dicts and lists, only as its text's pieces."""
        pieces: list[str] = []
        _canonical(self._json_fields(), pieces)
        return "".join(pieces)

    @property
    def version(self) -> str:
        """A content hash: two equal definitions share it, any change alters it."""
        return version_of(self.canonical_json())


def version_of(canonical_json: str) -> str:
    """The version of the program whose :meth:`ProgramDef.canonical_json` this is (for a
    caller that needs both, without building the JSON twice)."""
    digest = hashlib.sha256()
    # Encoded a slice at a time: a large definition is not copied whole.
    for start in range(0, len(canonical_json), _HASH_SLICE):
        digest.update(canonical_json[start : start + _HASH_SLICE].encode())
    return digest.hexdigest()[:32]


#: Characters of a definition encoded at a time to hash it.
_HASH_SLICE = 1 << 16
#: Items of a long list of a definition (steps, events) encoded to JSON at a time.
_ITEMS_PER_ENCODE = 256

#: The encoder of :meth:`ProgramDef.canonical_json` (``json.dumps``'s other defaults).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


class _Each:
    """A JSON list of ``make(item)`` for each item, made as it is encoded."""

    __slots__ = ("items", "make")

    def __init__(self, make: Callable[[Any], Any], items: Iterable[Any]) -> None:
        self.make = make
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return map(self.make, self.items)


def _plain(value: Any) -> Any:
    """``value`` with every :class:`_Each` (in it, or in its dicts) made a list."""
    if isinstance(value, _Each):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _canonical(value: Any, pieces: list[str]) -> None:
    """Append to ``pieces`` the text ``_CANONICAL`` makes of ``_plain(value)``, encoding
    (and letting go of) the items of each :class:`_Each` (plain JSON values) a few hundred
    at a time."""
    if isinstance(value, _Each):
        items = iter(value)
        pieces.append("[")
        first = True
        while chunk := list(itertools.islice(items, _ITEMS_PER_ENCODE)):
            if not first:
                pieces.append(",")
            first = False
            pieces.append(_CANONICAL.encode(chunk)[1:-1])  # the items, without [ ]
        pieces.append("]")
    elif isinstance(value, dict) and any(isinstance(item, _Each) for item in value.values()):
        pieces.append("{")
        for index, key in enumerate(sorted(value)):
            if index:
                pieces.append(",")
            pieces.append(_CANONICAL.encode(key))
            pieces.append(":")
            _canonical(value[key], pieces)
        pieces.append("}")
    else:
        pieces.append(_CANONICAL.encode(value))


def _event_json(e: EventDef) -> dict[str, Any]:
    """One event of :meth:`ProgramDef.to_json`."""
    return {"name": e.name, "expr": None if e.expr is None else _expr.to_json(e.expr)}


def _step_json(s: StepDef) -> dict[str, Any]:
    """One step of :meth:`ProgramDef.to_json`."""
    return {
        "name": s.name,
        "executor": s.executor,
        "target": s.target,
        "main_path": s.main_path,
        "argv": None if s.argv is None else list(s.argv),
        "args": list(s.args),
        "kwargs": dict(s.kwargs),
        "triggers": {k.value: list(v) for k, v in sorted(s.triggers.items())},
        "host": s.host,
        "sequence_arg_name": s.sequence_arg_name,
        "local_only": s.local_only,
        "group": s.group,
        "env": dict(sorted(s.env.items())),
        # Only when not the default: programs defined before it keep their version.
        **({} if s.recovery == "rerun" else {"recovery": s.recovery}),
        **({} if s.timeout is None else {"timeout": s.timeout}),
        **({} if s.retry is None else {"retry": s.retry.to_json()}),
        **({} if s.stop_on_exception is None else {"stop_on_exception": s.stop_on_exception}),
        **({"pass_logger": True} if s.pass_logger else {}),
        **({"acquires": [list(a) for a in s.acquires]} if s.acquires else {}),
        **({} if s.releases is None else {"releases": [list(r) for r in s.releases]}),
        **({} if s.max_concurrent is None else {"max_concurrent": s.max_concurrent}),
        **({"priority": s.priority} if s.priority else {}),
    }


def _json_problem(value: Any, path: str) -> str | None:
    """Where ``value`` would not come back from JSON as it went in, or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}, which JSON cannot carry"
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has the key {key!r}, which is not a string"
            problem = _json_problem(item, f"{path}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{path} is a {type(value).__name__}"


def check_json(value: Any, *, what: str) -> Any:
    """Return ``value`` if it survives a JSON round trip unchanged in kind, else raise.

    Tuples come back as lists; everything else must come back equal.

    Raises:
        SerializationError: naming ``what``, where in it the problem is, and the fix.
    """
    problem = _json_problem(value, "value")
    if problem:
        raise SerializationError(
            f"{what} cannot be carried as JSON: {problem}; pass only str, int, float, bool, "
            "None, lists and dicts with string keys (convert other objects yourself, e.g. "
            "a Path to str)"
        )
    return value


#: Module names under which a user's script is loaded by path.
SCRIPT_MODULES = frozenset({"__main__", "__aeventor_main__"})


def callable_target(func: Callable[..., Any], *, step: str) -> tuple[str, str | None, bool]:
    """Where a subprocess finds ``func``: ``(module:qualname, main script path, importable)``.

    A function of the user's ``__main__`` script is found by the script's path (loaded under
    another module name, as multiprocessing's spawn does), or by module name when the script
    was started with ``python -m``.
    """
    qualname = getattr(func, "__qualname__", None)
    module = getattr(func, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        raise ProgramDefinitionError(
            f"step {step!r}: func {func!r} has no module and qualified name; "
            "pass a function defined with def at module level"
        )
    if "<lambda>" in qualname or "<locals>" in qualname:
        return f"{module}:{qualname}", None, False
    if module in SCRIPT_MODULES:
        # The user's script: run as __main__, or loaded by path by the step runner or by
        # `aeventor submit` (which use another name so its __main__ guard stays shut).
        main = sys.modules[module]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name and spec.name not in SCRIPT_MODULES:
            return f"{spec.name}:{qualname}", None, True
        path = getattr(main, "__file__", None)
        if path is None:
            return f"__main__:{qualname}", None, False
        return f"__main__:{qualname}", str(path), True
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return f"{module}:{qualname}", None, False
    if inspect.unwrap(obj) is not inspect.unwrap(func):
        return f"{module}:{qualname}", None, False
    return f"{module}:{qualname}", None, True
