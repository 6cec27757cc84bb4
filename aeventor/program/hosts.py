"""Host assignment rules of distributed mode (pure; no I/O).

From the design notes: a step runs on its own host; else on its group's host; else on the
program's default host; else on the host of the step before it. If the steps before it run on
different hosts, that is an error. All of this is known when the program is defined, so the
error comes before anything is submitted.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping, Sequence

from ..exceptions import ProgramDefinitionError
from . import expr as _expr
from .model import ProgramDef

__all__ = ("assign_hosts", "predecessors", "resolve_hosts")


def _event_graph(program: ProgramDef) -> dict[str, list[str]]:
    """For each event, the events it leads to directly: its event assocs and the derived
    events whose expressions name it."""
    leads: dict[str, list[str]] = {}
    for event_name in dict.fromkeys([*program.assocs, *program.delays]):
        for kind, target in program.targets(event_name):
            if kind == "event":
                leads.setdefault(event_name, []).append(target)
    for event in program.events.values():
        if event.expr is not None:
            for ref in dict.fromkeys(_expr.names(event.expr)):
                leads.setdefault(ref, []).append(event.name)
    return leads


def _steps_reached(
    program: ProgramDef, event: str, leads: Mapping[str, Sequence[str]]
) -> dict[str, None]:
    """Steps an event leads to without passing through another step, in a stable order."""
    seen = {event}
    steps: dict[str, None] = {}
    queue = deque([event])
    while queue:
        current = queue.popleft()
        for kind, target in program.targets(current):
            if kind == "step":
                steps[target] = None
        for following in leads.get(current, ()):
            if following not in seen:
                seen.add(following)
                queue.append(following)
    return steps


def predecessors(program: ProgramDef) -> dict[str, set[str]]:
    """For each step, the steps whose triggers can make it ready."""
    leads = _event_graph(program)
    # Each fired event is walked once, however many steps fire it (a fan-in of n steps
    # firing one event used to walk it n times).
    reached: dict[str, dict[str, None]] = {}
    result: dict[str, set[str]] = {name: set() for name in program.steps}
    for step in program.steps.values():
        for fired in step.triggers.values():
            for event_name in fired:
                targets = reached.get(event_name)
                if targets is None:
                    targets = reached[event_name] = _steps_reached(program, event_name, leads)
                for target in targets:
                    result[target].add(step.name)
    return result


def assign_hosts(program: ProgramDef, *, default_host: str | None) -> dict[str, str]:
    """The host of every step, by the rules above.

    Raises:
        ProgramDefinitionError: a step whose host cannot be decided, or whose previous steps
            run on different hosts; the message names the step, the hosts and the fixes.
    """
    own: dict[str, str] = {}
    for step in program.steps.values():
        group = program.groups.get(step.group) if step.group else None
        host = step.host or (group.host if group else None) or default_host
        if host:
            own[step.name] = host
    preds = predecessors(program)
    # Hosts flow from the steps that have one to the steps after them, breadth first: each
    # step and each edge is looked at once (a fixed-point loop over every step took one
    # pass per step of a chain defined last-first). Where two hosts reach a step, the one
    # that reaches it first is kept; the check below reports the conflict either way.
    successors: dict[str, list[str]] = {name: [] for name in program.steps}
    for name in program.steps:
        for pred in sorted(preds[name]):
            successors[pred].append(name)
    hosts = dict(own)
    queue = deque(own)
    while queue:
        current = queue.popleft()
        for after in successors[current]:
            if after not in hosts:
                hosts[after] = hosts[current]
                queue.append(after)
    fix = "give it host=..., put it in a group with a host, or set Eventor(default_host=...)"
    for name in program.steps:
        if name in own:
            continue
        if name not in hosts:
            if not preds[name]:
                raise ProgramDefinitionError(
                    f"step {name!r} has no host and no step runs before it, so distributed "
                    f"mode cannot tell where to run it: {fix}"
                )
            raise ProgramDefinitionError(
                f"step {name!r} has no host and none of the steps before it "
                f"({', '.join(sorted(preds[name]))}) has one: {fix}"
            )
        before = {p: hosts[p] for p in sorted(preds[name]) if p in hosts}
        if len(set(before.values())) > 1:
            listed = ", ".join(f"{p} on {h}" for p, h in before.items())
            raise ProgramDefinitionError(
                f"step {name!r} has no host, and the steps before it run on different hosts "
                f"({listed}), so it is ambiguous where it runs: {fix}"
            )
    return hosts


def resolve_hosts(program: ProgramDef, *, default_host: str | None) -> ProgramDef:
    """The program with every step's host decided by the host rules."""
    hosts = assign_hosts(program, default_host=default_host)
    steps = {
        name: dataclasses.replace(step, host=hosts[name]) for name, step in program.steps.items()
    }
    return dataclasses.replace(program, steps=steps)
