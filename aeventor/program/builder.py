"""Defining a program: the validation behind ``Eventor.add_*`` and the :class:`ProgramDef` it builds.

:class:`ProgramBuilder` holds what has been defined so far (events, steps, groups, the
callables of steps, associations and initial triggers) and checks each definition as it is
added, so that a mistake raises at the line that made it. Every check costs time linear in
what it looks at, and :meth:`ProgramBuilder.program` builds (and validates, and assigns the
hosts of) the :class:`ProgramDef` once per change, not once per access.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..exceptions import ProgramDefinitionError
from . import expr as _expr
from .hosts import resolve_hosts
from .model import (
    EXECUTORS,
    POOL_SCOPES,
    PROCESS_EXECUTORS,
    TRIGGER_STATUSES,
    EventDef,
    GroupDef,
    PoolDef,
    ProgramDef,
    Retry,
    StepDef,
    StepStatus,
    callable_target,
    check_json,
)

__all__ = ("Event", "Group", "ProgramBuilder", "Step", "check_limit", "check_name", "name_of")

_NAME_MAX = 200
_STEP_CONFIG_KEYS = {
    "acquires",
    "executor",
    "max_concurrent",
    "pass_logger_to_task",
    "priority",
    "releases",
    "recovery",
    "retry",
    "sequence_arg_name",
    "stop_on_exception",
    "task_construct",
    "timeout",
}
#: What recovering a run may do with a step run that did not succeed.
RECOVERY_POLICIES = ("rerun", "skip")
# The original eventor's names for how a step runs.
_TASK_CONSTRUCT = {"process": "process", "invoke": "inloop", "inloop": "inloop"}


@dataclass(frozen=True, slots=True)
class _Named:
    """A named part of a program; prints as its name."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Event(_Named):
    """An event of a program (returned by :meth:`Eventor.add_event`).

    .. versionadded:: 0.1
    """

    expr: _expr.Expr | None = None


@dataclass(frozen=True, slots=True)
class Group(_Named):
    """A group of steps (returned by :meth:`Eventor.add_group`).

    .. versionadded:: 0.1
    """


@dataclass(frozen=True, slots=True)
class Step(_Named):
    """A step of a program (returned by :meth:`Eventor.add_step`).

    .. versionadded:: 0.1
    """


#: What a built program depends on besides the definitions: (name, stop_on_exception,
#: distributed, default_host, max_concurrent, host_max_concurrent).
_BuildKey = tuple[str, bool, bool, str | None, int | None, int | None]


class ProgramBuilder:
    """The definitions of one program, checked as they are added.

    The methods are those of :class:`~aeventor.Eventor` (which delegates to its builder),
    with the same arguments and errors.

    Attributes:
        events, steps, groups: the definitions by name, in the order they were added.
        funcs: the callables of function steps by step name (not part of the definition:
            the step that runs them finds them again by import path).
        assocs: for each event, the ``(kind, name)`` targets it fans out to, as an ordered
            dict used as an ordered set.
        delays: for each event, the ``(kind, name)`` targets it fans out to after a delay,
            with the delay in seconds.
        triggers: the ``(event, sequence)`` pairs fired when a run starts.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self.events: dict[str, EventDef] = {}
        self.steps: dict[str, StepDef] = {}
        self.groups: dict[str, GroupDef] = {}
        self.pools: dict[str, PoolDef] = {}
        self.funcs: dict[str, Callable[..., Any]] = {}
        self.assocs: dict[str, dict[tuple[str, str], None]] = {}
        self.delays: dict[str, dict[tuple[str, str], float]] = {}
        self.triggers: list[tuple[str, str]] = []
        self._built: tuple[_BuildKey, ProgramDef] | None = None
        #: How many times a program was built (and validated); tests count rebuilds.
        self.builds = 0

    def _changed(self) -> None:
        self._built = None

    def program(
        self,
        *,
        name: str,
        stop_on_exception: bool = True,
        distributed: bool = False,
        default_host: str | None = None,
        max_concurrent: int | None = None,
        host_max_concurrent: int | None = None,
    ) -> ProgramDef:
        """The program's definition as data, validated; with ``distributed``, every step's
        host decided by the host rules (see :mod:`aeventor.program.hosts`).

        Built on the first call after a change and kept: later calls with the same
        arguments return the same object. The object shares no mutable state with the
        builder, so later definitions never alter a program already handed out.

        Raises:
            ProgramDefinitionError: a reference to something undefined, or (distributed) a
                step whose host cannot be decided.
        """
        key: _BuildKey = (
            name,
            stop_on_exception,
            distributed,
            default_host,
            max_concurrent,
            host_max_concurrent,
        )
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        self.builds += 1
        definition = ProgramDef(
            name=name,
            events=dict(self.events),
            steps=dict(self.steps),
            assocs={k: tuple(v) for k, v in self.assocs.items()},
            stop_on_exception=stop_on_exception,
            groups=dict(self.groups),
            delays={
                k: tuple((kind, target, delay) for (kind, target), delay in v.items())
                for k, v in self.delays.items()
            },
            pools=dict(self.pools),
            max_concurrent=max_concurrent,
            host_max_concurrent=host_max_concurrent,
        )
        definition.validate()
        if distributed:
            # Every step's host decided by the host rules: an ambiguity fails here, before
            # anything is submitted.
            definition = resolve_hosts(definition, default_host=default_host)
        self._built = (key, definition)
        return definition

    def add_event(self, name: str, expr: Any = None) -> Event:
        """The checks and bookkeeping behind :meth:`aeventor.Eventor.add_event` (see there)."""
        self._check_new_name(name, "event")
        normalized = None if expr is None else _expr.normalize(expr)
        self._changed()
        self.events[name] = EventDef(name, normalized)
        return Event(name, normalized)

    def add_pool(self, name: str, size: int, *, scope: str = "program") -> None:
        """The checks and bookkeeping behind :meth:`aeventor.Eventor.add_pool` (see there)."""
        check_name(name, "pool")
        if name in self.pools:
            raise ProgramDefinitionError(f"pool {name!r} is already defined")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ProgramDefinitionError(
                f"pool {name!r}: size={size!r}; give how many slots it has, a whole number "
                "of 1 or more"
            )
        if scope not in POOL_SCOPES:
            raise ProgramDefinitionError(
                f"pool {name!r}: scope={scope!r}; use 'program' (each run has its own), "
                "'local' (one per host, shared by the runs there) or 'cluster' (one for "
                "every host, through the database)"
            )
        self._changed()
        self.pools[name] = PoolDef(name, size, scope)

    def add_group(
        self,
        name: str,
        *,
        host: str | None = None,
        env: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        max_concurrent: int | None = None,
    ) -> Group:
        """The checks and bookkeeping behind :meth:`aeventor.Eventor.add_group` (see there)."""
        check_name(name, "group")
        if name in self.groups:
            raise ProgramDefinitionError(f"group {name!r} is already defined")
        if host is not None:
            check_name(host, f"group {name!r}: host")
        env = dict(env or {})
        _check_env(env, f"group {name!r}")
        config = dict(config or {})
        _check_config(config, f"group {name!r}")
        check_json(config, what=f"group {name!r}: config")
        if max_concurrent is None:
            max_concurrent = config.pop("max_concurrent", None)
        limit = check_limit(max_concurrent, f"group {name!r}: max_concurrent")
        self._changed()
        self.groups[name] = GroupDef(name, host, env, config, limit)
        return Group(name)

    def add_step(
        self,
        name: str,
        func: Callable[..., Any] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        triggers: Mapping[StepStatus | str, Any] | None = None,
        host: str | None = None,
        *,
        command: Sequence[str] | None = None,
        executor: str | None = None,
        sequence_arg_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        group: Group | str | None = None,
        env: Mapping[str, str] | None = None,
        recovery: str | None = None,
        timeout: float | None = None,
        retry: Retry | Mapping[str, Any] | None = None,
        acquires: Iterable[tuple[str, int]] | None = None,
        releases: Iterable[tuple[str, int]] | None = None,
        max_concurrent: int | None = None,
        priority: int | None = None,
    ) -> Step:
        """The checks and bookkeeping behind :meth:`aeventor.Eventor.add_step` (see there)."""
        self._check_new_name(name, "step")
        group_name = None if group is None else name_of(group)
        group_def = None
        if group_name is not None:
            group_def = self.groups.get(group_name)
            if group_def is None:
                raise ProgramDefinitionError(
                    f"step {name!r}: undefined group {group_name!r}; define it with "
                    f"ev.add_group({group_name!r}, ...) first"
                )
        config = {**(group_def.config if group_def else {}), **(config or {})}
        step_env_vars = {**(group_def.env if group_def else {}), **(env or {})}
        _check_env(step_env_vars, f"step {name!r}")
        _check_config(config, f"step {name!r}")
        if "task_construct" in config:
            construct = config["task_construct"]
            if construct not in _TASK_CONSTRUCT:
                raise ProgramDefinitionError(
                    f"step {name!r}: config task_construct={construct!r} is not supported; "
                    "use 'process' or 'invoke' (in the engine's loop)"
                )
            executor = executor or _TASK_CONSTRUCT[construct]
        executor = executor or config.get("executor")
        sequence_arg_name = sequence_arg_name or config.get("sequence_arg_name")
        recovery = recovery or config.get("recovery") or "rerun"
        if recovery not in RECOVERY_POLICIES:
            raise ProgramDefinitionError(
                f"step {name!r}: recovery={recovery!r}; use 'rerun' (recovering the run runs "
                "it again when it did not succeed) or 'skip' (recovery keeps its outcome)"
            )
        if timeout is None:
            timeout = config.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < float("inf")
        ):
            raise ProgramDefinitionError(
                f"step {name!r}: timeout={timeout!r}; give the seconds a run of the step may "
                "take (a number more than 0), or None for no limit"
            )
        if retry is None:
            retry = config.get("retry")
        if isinstance(retry, Mapping):
            given = dict(retry)
            try:
                retry = Retry(**given)
            except TypeError as exc:
                raise ProgramDefinitionError(
                    f"step {name!r}: retry={given!r}: {exc}; its keys are attempts, "
                    "backoff, exponential, cap, jitter and on"
                ) from None
        for key in ("stop_on_exception", "pass_logger_to_task"):
            if key in config and not isinstance(config[key], bool):
                raise ProgramDefinitionError(
                    f"step {name!r}: config {key}={config[key]!r}; give True or False"
                )
        if retry is not None and not isinstance(retry, Retry):
            raise ProgramDefinitionError(
                f"step {name!r}: retry={retry!r}; give aeventor.Retry(attempts=3, ...) or a "
                "dict of its arguments"
            )
        acquired = self._slots(
            name, "acquires", acquires if acquires is not None else config.get("acquires")
        )
        released_given = releases if releases is not None else config.get("releases")
        released = None if released_given is None else self._slots(name, "releases", released_given)
        if max_concurrent is None:
            max_concurrent = config.get("max_concurrent")
        limit = check_limit(max_concurrent, f"step {name!r}: max_concurrent")
        if priority is None:
            priority = config.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ProgramDefinitionError(
                f"step {name!r}: priority={priority!r}; give a whole number (higher goes "
                "first among steps waiting for the same slots; default 0)"
            )
        kwargs = dict(kwargs or {})
        args = tuple(args)
        if any(not isinstance(k, str) for k in kwargs):
            raise ProgramDefinitionError(f"step {name!r}: kwargs keys must be strings")
        check_json(list(args), what=f"step {name!r}: args")
        check_json(kwargs, what=f"step {name!r}: kwargs")
        if host is not None:
            check_name(host, f"step {name!r}: host")
        step_triggers = self._normalize_triggers(name, triggers)

        target = main_path = None
        argv: tuple[str, ...] | None = None
        local_only = False
        if command is not None:
            if func is not None:
                raise ProgramDefinitionError(
                    f"step {name!r}: give either func or command, not both"
                )
            if (
                isinstance(command, str)
                or not command
                or not all(isinstance(a, str) for a in command)
            ):
                raise ProgramDefinitionError(
                    f"step {name!r}: command must be a non-empty list of strings (an argv, "
                    f"e.g. ['ls', '-l']); got {command!r}. For a shell line use "
                    "['sh', '-c', 'line']"
                )
            if args or kwargs:
                raise ProgramDefinitionError(
                    f"step {name!r}: a command step takes no args/kwargs; put them in the argv"
                )
            if executor not in (None, "command"):
                raise ProgramDefinitionError(
                    f"step {name!r}: a command step runs as executor 'command', not {executor!r}"
                )
            executor, argv = "command", tuple(command)
        elif func is not None:
            if not callable(func):
                raise ProgramDefinitionError(
                    f"step {name!r}: func must be a callable, got {func!r}"
                )
            is_async = inspect.iscoroutinefunction(inspect.unwrap(func))
            executor = executor or ("inloop" if is_async else "warm")
            if executor not in EXECUTORS - {"command"}:
                raise ProgramDefinitionError(
                    f"step {name!r}: executor={executor!r} is not one of 'warm', 'process', "
                    "'inloop' (or pass command=[...] for a command step)"
                )
            if executor == "inloop" and not is_async:
                raise ProgramDefinitionError(
                    f"step {name!r}: executor 'inloop' needs an async def function; "
                    f"{func.__qualname__} is a plain function (let it run as a 'warm' or "
                    "'process' step)"
                )
            target, main_path, importable = callable_target(func, step=name)
            # Many steps often run one function: one copy of its path for all of them.
            target = sys.intern(target)
            main_path = None if main_path is None else sys.intern(main_path)
            if not importable:
                if executor in PROCESS_EXECUTORS:
                    raise ProgramDefinitionError(
                        f"step {name!r}: func {target} cannot be imported by path, so a step "
                        "subprocess cannot find it (a lambda, a nested function, or a script "
                        "without a file). Define it with def at module level of an importable "
                        "module or script"
                    )
                local_only = True
            self._changed()
            self.funcs[name] = func
        else:
            if args or kwargs:
                raise ProgramDefinitionError(
                    f"step {name!r}: args/kwargs given but no func to pass them to"
                )
            if executor not in (None, "warm", "process", "inloop"):
                raise ProgramDefinitionError(
                    f"step {name!r}: executor={executor!r} does not fit a no-op step (no func, "
                    "no command); leave executor out, or pass func=... or command=[...]"
                )
            executor = executor or "process"

        self._changed()
        self.steps[name] = StepDef(
            name=name,
            executor=executor,
            target=target,
            main_path=main_path,
            argv=argv,
            args=args,
            kwargs=kwargs,
            triggers=step_triggers,
            host=host,
            sequence_arg_name=sequence_arg_name,
            local_only=local_only,
            group=group_name,
            env=step_env_vars,
            recovery=recovery,
            timeout=None if timeout is None else float(timeout),
            retry=retry,
            stop_on_exception=config.get("stop_on_exception"),
            pass_logger=bool(config.get("pass_logger_to_task", False)),
            acquires=acquired,
            releases=released,
            max_concurrent=limit,
            priority=priority,
        )
        return Step(name)

    def _slots(self, step: str, what: str, given: Any) -> tuple[tuple[str, int], ...]:
        """``acquires``/``releases`` as ``((pool, slots), ...)``, each pool defined."""
        if given is None:
            return ()
        fix = f"give a list of (pool, slots) pairs, e.g. {what}=[('db', 1)]"
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise ProgramDefinitionError(f"step {step!r}: {what}={given!r}; {fix}")
        wanted: dict[str, int] = {}
        for item in given:
            if isinstance(item, str):
                item = (item, 1)
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ProgramDefinitionError(f"step {step!r}: {what}={given!r}; {fix}")
            pool, slots = name_of(item[0]), item[1]
            if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
                raise ProgramDefinitionError(
                    f"step {step!r}: {what} {slots!r} slots of pool {pool!r}; give a whole "
                    "number of 1 or more"
                )
            definition = self.pools.get(pool)
            if definition is None:
                raise ProgramDefinitionError(
                    f"step {step!r}: {what} names undefined pool {pool!r}; define it first "
                    f"with ev.add_pool({pool!r}, size)"
                )
            wanted[pool] = wanted.get(pool, 0) + slots
            if what == "acquires" and wanted[pool] > definition.size:
                raise ProgramDefinitionError(
                    f"step {step!r}: acquires {wanted[pool]} slots of pool {pool!r}, which "
                    f"has {definition.size}: it could never start; ask for fewer or make "
                    "the pool larger"
                )
        return tuple(wanted.items())

    def add_assoc(self, event: Event | str, *targets: Step | Event | str, delay: float = 0) -> None:
        """The checks and bookkeeping behind :meth:`aeventor.Eventor.add_assoc` (see there)."""
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay < float("inf")
        ):
            raise ProgramDefinitionError(
                f"add_assoc({name_of(event)!r}, ..., delay={delay!r}): give the seconds to "
                "wait after the event fires (a number, 0 for none)"
            )
        event_name = self._event_name(event, "add_assoc")
        if not targets:
            raise ProgramDefinitionError(
                f"add_assoc({event_name!r}): name at least one step or event to associate"
            )
        # Resolve every target before changing anything: a bad one leaves no partial assoc.
        resolved = [self._target(target, event_name) for target in targets]
        self._changed()
        if delay:
            self.delays.setdefault(event_name, {}).update(dict.fromkeys(resolved, float(delay)))
            return
        # An ordered dict per event: a duplicate check that costs O(1), not a list scan
        # (which made a fan-out of n targets cost n²/2 comparisons).
        self.assocs.setdefault(event_name, {}).update(dict.fromkeys(resolved))

    def trigger_event(self, event: Event | str, sequence: str | int = 0) -> None:
        """The checks and bookkeeping behind :meth:`aeventor.Eventor.trigger_event` (see there)."""
        name = self._event_name(event, "trigger_event")
        check_name(str(sequence), "sequence")
        self.triggers.append((name, str(sequence)))

    def _check_new_name(self, name: str, kind: str) -> None:
        check_name(name, kind)
        if name in self.events or name in self.steps:
            other = "an event" if name in self.events else "a step"
            raise ProgramDefinitionError(
                f"{kind} {name!r}: the name is already used by {other}; event and step "
                "names must be unique within a program"
            )

    def _event_name(self, event: Event | str, where: str) -> str:
        name = name_of(event)
        if name not in self.events:
            raise ProgramDefinitionError(
                f"{where}: undefined event {name!r}; define it with ev.add_event({name!r})"
            )
        return name

    def _target(self, target: Step | Event | str, event: str) -> tuple[str, str]:
        if isinstance(target, Step):
            kind, name = "step", target.name
        elif isinstance(target, Event):
            kind, name = "event", target.name
        elif isinstance(target, str):
            name = target
            kind = "step" if target in self.steps else "event"
        else:
            raise ProgramDefinitionError(
                f"add_assoc({event!r}, ...): {target!r} is not a step or an event"
            )
        table: Mapping[str, object] = self.steps if kind == "step" else self.events
        if name not in table:
            raise ProgramDefinitionError(
                f"add_assoc({event!r}, ...): undefined step or event {name!r}; define it "
                f"with ev.add_step({name!r}, ...) or ev.add_event({name!r}) first"
            )
        return kind, name

    def _normalize_triggers(
        self, step: str, triggers: Mapping[StepStatus | str, Any] | None
    ) -> dict[StepStatus, tuple[str, ...]]:
        result: dict[StepStatus, tuple[str, ...]] = {}
        for key, events in (triggers or {}).items():
            try:
                status = StepStatus(key)
            except ValueError:
                status = None
            if status not in TRIGGER_STATUSES:
                raise ProgramDefinitionError(
                    f"step {step!r}: triggers key {key!r} is not a trigger status; use "
                    "StepStatus.ready, active, success, failure or complete"
                )
            assert status is not None
            if isinstance(events, Event | str):
                items: Iterable[Any] = (events,)
            elif isinstance(events, Iterable):
                items = events
            else:
                raise ProgramDefinitionError(
                    f"step {step!r}: triggers[{status.value}] must be an event or a tuple of "
                    f"events, got {events!r}"
                )
            names = []
            for item in items:
                name = name_of(item)
                if name not in self.events:
                    raise ProgramDefinitionError(
                        f"step {step!r}: triggers[{status.value}] names undefined event "
                        f"{name!r}; define it with ev.add_event({name!r}) first"
                    )
                names.append(name)
            result[status] = tuple(dict.fromkeys(names))
        return result


def name_of(value: Any) -> str:
    name = getattr(value, "name", value)
    if not isinstance(name, str):
        raise ProgramDefinitionError(f"expected an event, a step or a name, got {value!r}")
    return name


def _check_config(config: Mapping[str, Any], where: str) -> None:
    unknown = set(config) - _STEP_CONFIG_KEYS
    if unknown:
        raise ProgramDefinitionError(
            f"{where}: unknown config key(s) {sorted(unknown)}; "
            f"known keys are {sorted(_STEP_CONFIG_KEYS)}"
        )


def check_limit(value: Any, what: str) -> int | None:
    """A ``max_concurrent``-style limit: None, or a whole number of 1 or more."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProgramDefinitionError(
            f"{what}={value!r}; give a whole number of 1 or more, or None for no limit"
        )
    return value


def _check_env(env: Mapping[str, Any], where: str) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or not isinstance(value, str):
            raise ProgramDefinitionError(
                f"{where}: env must map variable names to strings; got {key!r}: {value!r}"
            )


def check_name(name: Any, kind: str) -> None:
    if not isinstance(name, str) or not name or len(name) > _NAME_MAX or name != name.strip():
        raise ProgramDefinitionError(
            f"{kind} name {name!r} is not valid: use a non-empty string of at most "
            f"{_NAME_MAX} characters without surrounding spaces"
        )
