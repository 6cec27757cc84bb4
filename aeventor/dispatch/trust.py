"""Where a worker gets the program of a claimed step run, and whether it may run it.

A standalone run's worker was handed its program by the process that defined it
(:class:`OwnProgram`). An agent trusts only what the cluster key signed
(:class:`SignedPrograms`): the program version and the run are each verified once and cached
(a verified :class:`~._state.Graph` per program version, not per run), the verification of a
definition (parse, canonical form, HMAC) runs off the event loop, and a step's module, script
or command must match the agent's ``--allow`` patterns.

Every claimed step run is checked too (:meth:`Programs.check_claim`), before anything runs:
its MAC (:func:`aeventor.signing.step_run_mac`, one HMAC of a short string, cheap enough for
the loop) must verify over its run, program version, step, sequence, recovery, attempt, host
and queue, and its queue must be one of the agent's hosts and its host's. So a row inserted
into the database, copied from another step run or re-routed to another host is refused,
whatever the program and run it names. The graphs of :class:`SignedPrograms` hold the key:
the step runs that an agent's transactions create are signed in turn.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from .. import signing
from ..exceptions import AeventorError
from ..program.model import ProgramDef
from ._state import Graph

if TYPE_CHECKING:
    from .claims import Claim
    from .store import Store, StoredProgram

__all__ = ("OwnProgram", "Programs", "Refused", "SignedPrograms")

_K = TypeVar("_K")
_V = TypeVar("_V")

#: Verified program versions and run origins kept per agent.
_CACHE = 1024


class Refused(AeventorError):
    """A step run this worker will not execute; the message says why."""


class Programs(Protocol):
    """The programs a worker serves."""

    async def graph_for(self, run_id: str) -> Graph:
        """The run's program; :class:`Refused` if it cannot be trusted."""

    def check_claim(self, graph: Graph, claim: Claim, *, executing: bool = True) -> None:
        """Raise :class:`Refused` unless ``claim`` is a step run as its creator made it (its
        row verifies); ``graph`` is the run's, from :meth:`graph_for`.

        Args:
            executing: this worker is to execute it, so it must be queued for one of its
                hosts (a reaper recording another host's step run lost passes False).
        """

    def check_step(self, program: ProgramDef, step: str) -> None:
        """Raise :class:`Refused` if this worker may not execute ``step``."""

    def forget(self, run_id: str) -> bool:
        """Drop what is remembered of the run's program (a forced recovery may have moved
        the run to another version); whether anything was."""


class OwnProgram:
    """The one program of a standalone run, defined in this process."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    async def graph_for(self, run_id: str) -> Graph:
        return self.graph

    def check_claim(self, graph: Graph, claim: Claim, *, executing: bool = True) -> None:
        # The defining process made every step run of its run itself.
        return None

    def check_step(self, program: ProgramDef, step: str) -> None:
        return None

    def forget(self, run_id: str) -> bool:
        return False


class SignedPrograms:
    """Programs and runs signed with the cluster key; steps matching ``allow``.

    Args:
        store: where runs and programs are read.
        key: the cluster key.
        allow: fnmatch patterns; a step's module (or script path, or command) must match one.
        hosts: the hosts this worker serves: a claimed step run must be queued for one of
            them (None: not checked; the MAC still binds the step run to its host).
    """

    def __init__(
        self,
        store: Store,
        *,
        key: bytes,
        allow: Sequence[str],
        hosts: Sequence[str] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.allow = tuple(allow)
        self.hosts = None if hosts is None else frozenset(hosts)
        self._graphs: OrderedDict[int, Graph] = OrderedDict()
        self._runs: OrderedDict[str, int] = OrderedDict()
        self._loading: dict[int, asyncio.Lock] = {}

    async def graph_for(self, run_id: str) -> Graph:
        program_id = self._runs.get(run_id)
        if program_id is not None:
            self._runs.move_to_end(run_id)
            return await self._graph(program_id)
        origin = await self.store.run_origin(run_id)
        graph = await self._graph(origin.program_id)
        expected = signing.run_signature(
            self.key, run_id=run_id, program_id=origin.program_id, version=graph.version
        )
        if not signing.verify(origin.signature, expected):
            raise Refused(
                f"run {run_id}: its signature does not verify with this agent's cluster key"
            )
        _remember(self._runs, run_id, origin.program_id)
        return graph

    def forget(self, run_id: str) -> bool:
        return self._runs.pop(run_id, None) is not None

    async def _graph(self, program_id: int) -> Graph:
        cached = self._graphs.get(program_id)
        if cached is not None:
            self._graphs.move_to_end(program_id)
            return cached
        lock = self._loading.setdefault(program_id, asyncio.Lock())
        async with lock:
            cached = self._graphs.get(program_id)
            if cached is None:
                stored = await self.store.stored_program(program_id)
                # Parsing and hashing a big definition takes long: not on the loop.
                cached = await asyncio.to_thread(_verified_graph, stored, self.key)
                _remember(self._graphs, program_id, cached)
        self._loading.pop(program_id, None)
        return cached

    def check_claim(self, graph: Graph, claim: Claim, *, executing: bool = True) -> None:
        program = graph.program
        what = (
            f"step run {claim.id} ({claim.step}[{claim.sequence}] recovery {claim.recovery} "
            f"attempt {claim.attempt}, host {claim.host!r}, queue {claim.queue!r})"
        )
        step = program.steps.get(claim.step)
        if step is None:
            raise Refused(
                f"{what}: program {program.name!r} version {graph.version} has no such "
                "step (a row written into the database by hand?)"
            )
        if executing and self.hosts is not None and claim.queue not in self.hosts:
            raise Refused(f"{what}: queued for a host this agent does not serve")
        if claim.queue != claim.host or claim.host != step.host:
            raise Refused(
                f"{what}: the program assigns the step to host {step.host!r}; the row was "
                "re-routed in the database"
            )
        expected = signing.step_run_mac(
            self.key,
            run_id=claim.run_id,
            version=graph.version,
            step=claim.step,
            sequence=claim.sequence,
            recovery=claim.recovery,
            attempt=claim.attempt,
            host=claim.host,
            queue=claim.queue,
        )
        if claim.mac is None:
            raise Refused(
                f"{what}: it carries no MAC; only holders of the cluster key create step runs "
                "(a row written into the database by hand?)"
            )
        if not signing.verify(claim.mac, expected):
            raise Refused(
                f"{what}: its MAC does not verify with this agent's cluster key (a row "
                "inserted, copied from another step run, or re-routed in the database)"
            )

    def check_step(self, program: ProgramDef, step: str) -> None:
        definition = program.steps[step]
        if definition.local_only:
            raise Refused(
                f"step {step!r} is an in-loop closure that only the defining process can "
                "run; define it at module level to run it on an agent"
            )
        if definition.argv is not None:
            # A command is code too: its program must be allowed like a module.
            candidates = [definition.argv[0]]
        elif definition.target is None:
            return  # a no-op runs nothing
        else:
            module = definition.target.partition(":")[0]
            candidates = [module] + ([definition.main_path] if definition.main_path else [])
        if not any(
            fnmatch.fnmatchcase(candidate, pattern)
            for candidate in candidates
            for pattern in self.allow
        ):
            shown = candidates[-1]
            raise Refused(
                f"step {step!r}: {shown!r} is not allowed on this agent; start the agent "
                f"with --allow {shown!r} (or a pattern matching it)"
            )


def _verified_graph(stored: StoredProgram, key: bytes) -> Graph:
    try:
        program = ProgramDef.from_json(json.loads(stored.definition))
    except (ValueError, KeyError, TypeError, AeventorError) as exc:
        raise Refused(
            f"program {stored.name!r} version {stored.version}: its stored definition cannot "
            f"be read ({type(exc).__name__}: {exc})"
        ) from exc
    if program.version != stored.version or program.canonical_json() != stored.definition:
        raise Refused(f"program {stored.name!r}: stored definition does not match its version")
    expected = signing.definition_signature(key, stored.name, stored.version, stored.definition)
    if not signing.verify(stored.signature, expected):
        raise Refused(
            f"program {stored.name!r} version {stored.version}: its signature does not "
            "verify with this agent's cluster key (tampered, or submitted with another key)"
        )
    # The agent's transactions sign the step runs they create with the same key.
    return Graph(program, signer=signing.step_run_signer(key))


def _remember(cache: OrderedDict[_K, _V], key: _K, value: _V) -> None:
    cache[key] = value
    if len(cache) > _CACHE:
        cache.popitem(last=False)
