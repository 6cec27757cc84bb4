"""Host assignment rules of distributed mode (pure; no I/O).

From the design notes: a step runs on its own host; else on its group's host; else on the
program's default host; else on the host of the step before it. If the steps before it run on
different hosts, that is an error. All of this is known when the program is defined, so the
error comes before anything is submitted.
"""

from __future__ import annotations

from collections import deque

from ..exceptions import ProgramDefinitionError
from . import expr as _expr
from .model import ProgramDef

__all__ = ("assign_hosts", "predecessors")


def _steps_reached(program: ProgramDef, event: str, dependents: dict[str, list[str]]) -> set[str]:
    """Steps an event leads to without passing through another step."""
    seen: set[str] = set()
    steps: set[str] = set()
    queue = deque([event])
    while queue:
        current = queue.popleft()
        if current in seen:
            continue
        seen.add(current)
        for kind, target in program.assocs.get(current, ()):
            if kind == "step":
                steps.add(target)
            else:
                queue.append(target)
        queue.extend(dependents.get(current, ()))
    return steps


def predecessors(program: ProgramDef) -> dict[str, set[str]]:
    """For each step, the steps whose triggers can make it ready."""
    dependents: dict[str, list[str]] = {}
    for event in program.events.values():
        if event.expr is not None:
            for ref in set(_expr.names(event.expr)):
                dependents.setdefault(ref, []).append(event.name)
    result: dict[str, set[str]] = {name: set() for name in program.steps}
    for step in program.steps.values():
        for fired in step.triggers.values():
            for event_name in fired:
                for target in _steps_reached(program, event_name, dependents):
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
    hosts = dict(own)
    changed = True
    while changed:
        changed = False
        for name in program.steps:
            if name in hosts:
                continue
            known = sorted({hosts[p] for p in preds[name] if p in hosts})
            if known:
                hosts[name] = known[0]
                changed = True
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
