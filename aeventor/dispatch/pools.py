"""Counted pools and concurrency limits: which slots a step run needs, and who gets them.

Every limit is a pool. ``ev.add_pool(name, size, scope)`` makes one; ``max_concurrent`` of a
step or a group, a distributed run's ``max_concurrency`` and ``max_concurrency_per_host`` are
pools of that size of which each step run concerned takes one slot. A pool is named by a key
that says whose it is:

=========  ======================================  ==========================================
scope      key                                     shared by
=========  ======================================  ==========================================
program    ``program:<run>:<pool>``                the steps of one run
local      ``local:<host>:<pool>``                 every run on that host
cluster    ``cluster:<pool>``                      every run on every host
step       ``step:<run>:<step>``                   the sequences of one step in one run
group      ``group:<run>:<group>``                 the steps of one group in one run
run        ``run:<run>``                           the steps of one run (distributed)
host       ``host:<host>``                         every run on that host that sets the limit
=========  ======================================  ==========================================

A step run that needs slots is made ``waiting``, with one row per pool it needs. In the same
transaction, and in every transaction that gives slots back (a step run's end, a cancel, a
run's end), :func:`admit` decides which waiting step runs now get all theirs: they become
``ready`` for any claimer. This module is pure (the store locks the pools and reads the rows);
the transactions in :mod:`.transactions` call it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..program.model import ProgramDef

__all__ = ("LOCAL_HOST", "Request", "Waiter", "admit", "requests", "templates")

#: The host of a step that names none: the one where it runs, this process's (a standalone
#: run's step runs are made by its own worker, on its host).
LOCAL_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Request:
    """``slots`` of the pool ``key``, which holds ``size`` in all (as the requester's program
    defines it)."""

    key: str
    slots: int
    size: int


#: A request before it is bound to a run and a host: ``(scope, name, slots, size)``.
Template = tuple[str, str, int, int]


def templates(program: ProgramDef) -> dict[str, tuple[Template, ...]]:
    """Per step, the pools and limits its step runs take slots of (steps needing none are
    left out, so an empty result means the program never waits for slots)."""
    found: dict[str, tuple[Template, ...]] = {}
    for step in program.steps.values():
        wanted: list[Template] = []
        for pool_name, slots in step.acquires:
            pool = program.pools[pool_name]
            wanted.append((pool.scope, pool_name, slots, pool.size))
        if step.max_concurrent is not None:
            wanted.append(("step", step.name, 1, step.max_concurrent))
        group = program.groups.get(step.group) if step.group is not None else None
        if group is not None and group.max_concurrent is not None:
            wanted.append(("group", group.name, 1, group.max_concurrent))
        if program.max_concurrent is not None:
            wanted.append(("run", "", 1, program.max_concurrent))
        if program.host_max_concurrent is not None:
            wanted.append(("host", "", 1, program.host_max_concurrent))
        if wanted:
            found[step.name] = tuple(wanted)
    return found


def pool_key(scope: str, name: str, *, run_id: str, host: str | None) -> str:
    """The key of a pool (see the module's table)."""
    where = host or LOCAL_HOST
    if scope == "cluster":
        return f"cluster:{name}"
    if scope == "local":
        return f"local:{where}:{name}"
    if scope == "host":
        return f"host:{where}"
    if scope == "run":
        return f"run:{run_id}"
    return f"{scope}:{run_id}:{name}"  # program, step, group


def run_scoped(key: str) -> bool:
    """Whether the pool ``key`` belongs to one run (and goes with it)."""
    return key.split(":", 1)[0] in ("program", "step", "group", "run")


def requests(wanted: Iterable[Template], *, run_id: str, host: str | None) -> tuple[Request, ...]:
    """The templates of a step bound to one of its step runs."""
    merged: dict[str, Request] = {}
    for scope, name, slots, size in wanted:
        key = pool_key(scope, name, run_id=run_id, host=host)
        earlier = merged.get(key)
        merged[key] = Request(key, slots + (earlier.slots if earlier else 0), size)
    return tuple(merged.values())


@dataclass(frozen=True, slots=True)
class Waiter:
    """A waiting step run and everything it needs: ``{pool key: (slots, size)}``. ``complete``
    is False when some of what it needs lies outside the pools the caller locked."""

    step_run_id: int
    needs: Mapping[str, tuple[int, int]]
    complete: bool = True


def admit(waiters: Sequence[Waiter], held: Mapping[str, int]) -> list[int]:
    """Which waiters get all their slots now, given the slots ``held`` per pool.

    ``waiters`` come in the order they are served (priority, then first come). A waiter is
    admitted when every pool it needs has room for it; otherwise it takes nothing, and no
    later waiter may take from any pool it needs (so no later one starves it: a pool it
    waits for fills up only with what was there before it). Waiters of other pools go on.
    """
    used = dict(held)
    blocked: set[str] = set()
    admitted: list[int] = []
    for waiter in waiters:
        pools = waiter.needs.keys()
        if (
            waiter.complete
            and blocked.isdisjoint(pools)
            and all(used.get(key, 0) + slots <= size for key, (slots, size) in waiter.needs.items())
        ):
            for key, (slots, _) in waiter.needs.items():
                used[key] = used.get(key, 0) + slots
            admitted.append(waiter.step_run_id)
        else:
            blocked.update(pools)
    return admitted
