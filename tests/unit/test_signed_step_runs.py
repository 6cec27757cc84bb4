"""Signed step runs: the MAC function, the graphs that sign, and what an agent refuses.

The MAC binds a step run to its run, program version, step, sequence, recovery, attempt,
host and queue; :meth:`SignedPrograms.check_claim` refuses a row that was inserted without
the key, copied from another step run, or re-routed to another host. Everything here runs
on the in-memory store: the claims are those a real claim returns.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

import aeventor as evr
from aeventor import signing
from aeventor.dispatch import Graph
from aeventor.dispatch.claims import Claim
from aeventor.dispatch.trust import OwnProgram, Refused, SignedPrograms
from aeventor.submission import submit
from aeventor.testing import InMemoryStore

KEY = b"k" * 32
OTHER = b"o" * 32

FIELDS: dict[str, Any] = {
    "run_id": "r1",
    "version": "v1",
    "step": "s0",
    "sequence": "1",
    "recovery": 0,
    "attempt": 1,
    "host": "h1",
    "queue": "h1",
}


def two_hosts() -> Graph:
    """start -> a on h1 and b on h2."""
    ev = evr.Eventor(name="two", store=":memory:", mode="distributed")
    ev.add_event("start")
    ev.add_step("a", host="h1")
    ev.add_step("b", host="h2")
    ev.add_assoc("start", "a", "b")
    return Graph(ev.program)


# -- the MAC -----------------------------------------------------------------------------------


def test_the_mac_is_an_hmac_of_the_key_over_every_field() -> None:
    mac = signing.step_run_mac(KEY, **FIELDS)
    assert mac == signing.step_run_mac(KEY, **FIELDS)
    assert len(mac) == 64 and int(mac, 16) >= 0
    assert signing.step_run_mac(OTHER, **FIELDS) != mac


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("run_id", "r2"),
        ("version", "v2"),
        ("step", "s1"),
        ("sequence", "2"),
        ("recovery", 1),
        ("attempt", 2),
        ("host", "h2"),
        ("queue", "h2"),
        ("host", None),
        ("queue", None),
    ],
)
def test_the_mac_changes_with_each_field(field: str, other: object) -> None:
    assert signing.step_run_mac(KEY, **{**FIELDS, field: other}) != signing.step_run_mac(
        KEY, **FIELDS
    )


def test_no_choice_of_names_makes_two_step_runs_encode_alike() -> None:
    # Separators inside the values cannot shift one field into the next.
    pairs = [
        ({"step": "a", "sequence": "b\x1fc"}, {"step": "a\x1fb", "sequence": "c"}),
        ({"step": "a", "sequence": 'b","c'}, {"step": 'a","b', "sequence": "c"}),
        ({"host": "", "queue": None}, {"host": None, "queue": ""}),
        ({"sequence": "1", "recovery": 0}, {"sequence": "10", "recovery": 0}),
    ]
    for left, right in pairs:
        assert signing.step_run_mac(KEY, **{**FIELDS, **left}) != signing.step_run_mac(
            KEY, **{**FIELDS, **right}
        ), (left, right)


def test_the_macs_of_many_step_runs_are_distinct() -> None:
    macs = {
        signing.step_run_mac(KEY, **{**FIELDS, "sequence": str(seq), "attempt": attempt})
        for seq, attempt in itertools.product(range(20), range(1, 13))
    }
    assert len(macs) == 20 * 12


def test_verify_compares_whatever_the_database_holds() -> None:
    mac = signing.step_run_mac(KEY, **FIELDS)
    assert signing.verify(mac, mac)
    assert not signing.verify(None, mac)
    assert not signing.verify("", mac)
    assert not signing.verify(mac.upper(), mac)
    # Non-ASCII text in the column must not raise (compare_digest would, on str).
    assert not signing.verify("é" * 64, mac)
    assert not signing.verify("\udcff" + mac[1:], mac)


# -- graphs that sign ---------------------------------------------------------------------------


def test_a_graph_signs_only_with_a_signer() -> None:
    program = two_hosts().program
    plain = Graph(program)
    keyed = Graph(program, signer=signing.step_run_signer(KEY))
    args: dict[str, Any] = {
        "run_id": "r1",
        "step": "a",
        "sequence": "0",
        "recovery": 0,
        "attempt": 1,
        "host": "h1",
        "queue": "h1",
    }
    assert not plain.signs and plain.sign(**args) is None
    assert keyed.signs
    assert keyed.sign(**args) == signing.step_run_mac(KEY, version=program.version, **args)


async def claims(store: InMemoryStore, *hosts: str) -> list[Claim]:
    return await store.claim(worker="w", limit=10, hosts=list(hosts))


async def test_submitted_step_runs_carry_their_mac() -> None:
    store = InMemoryStore()
    graph = two_hosts()
    await submit(store, graph.program, [("start", "0")], key=KEY, run_id="r1")

    taken = await claims(store, "h1", "h2")

    assert sorted((c.step, c.host, c.queue) for c in taken) == [
        ("a", "h1", "h1"),
        ("b", "h2", "h2"),
    ]
    for claim in taken:
        assert claim.mac == signing.step_run_mac(
            KEY,
            run_id="r1",
            version=graph.program.version,
            step=claim.step,
            sequence="0",
            recovery=0,
            attempt=1,
            host=claim.host,
            queue=claim.queue,
        )


async def test_standalone_step_runs_carry_no_mac() -> None:
    store = InMemoryStore()
    graph = Graph(two_hosts().program, signer=signing.step_run_signer(KEY))
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("start", "0")])

    taken = await store.claim(worker="w", limit=10, run_id=run_id)

    assert len(taken) == 2
    assert all(c.mac is None and c.queue is None for c in taken)


# -- check_claim --------------------------------------------------------------------------------


@pytest.fixture
async def signed() -> tuple[InMemoryStore, SignedPrograms, Claim, Claim]:
    """A submitted run of :func:`two_hosts`, an agent's programs for h1, and both claims."""
    store = InMemoryStore()
    await submit(store, two_hosts().program, [("start", "0")], key=KEY, run_id="r1")
    a, b = sorted(await claims(store, "h1", "h2"), key=lambda c: c.step)
    return store, SignedPrograms(store, key=KEY, allow=["*"], hosts=["h1"]), a, b


async def test_a_signed_claim_passes(signed: Any) -> None:
    _, programs, a, _ = signed
    graph = await programs.graph_for("r1")
    programs.check_claim(graph, a)
    assert graph.signs  # the agent's own transactions sign what they make


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mac": None}, "carries no MAC"),
        ({"mac": "0" * 64}, "MAC does not verify"),
        ({"mac": "not hex at all, ünïcode"}, "MAC does not verify"),
        ({"attempt": 2}, "MAC does not verify"),
        ({"attempt": 12}, "MAC does not verify"),
        ({"recovery": 1}, "MAC does not verify"),
        ({"sequence": "1"}, "MAC does not verify"),
        ({"run_id": "r2"}, "MAC does not verify"),
        ({"step": "nope"}, "has no such step"),
    ],
    ids=[
        "no-mac",
        "forged",
        "garbage",
        "attempt-2",
        "attempt-12",
        "recovery",
        "sequence",
        "run",
        "unknown-step",
    ],
)
async def test_inserted_or_copied_rows_are_refused(
    signed: Any, change: dict[str, Any], reason: str
) -> None:
    _, programs, a, _ = signed
    graph = await programs.graph_for("r1")

    with pytest.raises(Refused) as info:
        programs.check_claim(graph, dataclasses.replace(a, **change))

    assert reason in str(info.value), info.value
    assert f"step run {a.id}" in str(info.value)


async def test_a_mac_made_with_another_key_is_refused(signed: Any) -> None:
    _, programs, a, _ = signed
    graph = await programs.graph_for("r1")
    forged = signing.step_run_mac(
        OTHER,
        run_id=a.run_id,
        version=graph.program.version,
        step=a.step,
        sequence=a.sequence,
        recovery=a.recovery,
        attempt=a.attempt,
        host=a.host,
        queue=a.queue,
    )
    with pytest.raises(Refused, match="MAC does not verify"):
        programs.check_claim(graph, dataclasses.replace(a, mac=forged))


async def test_rerouted_rows_are_refused(signed: Any) -> None:
    _, programs, a, b = signed
    graph = await programs.graph_for("r1")
    # b belongs to h2; moved into h1's queue (with or without its host) it is not h1's work.
    with pytest.raises(Refused, match="re-routed"):
        programs.check_claim(graph, dataclasses.replace(b, queue="h1"))
    with pytest.raises(Refused, match="re-routed"):
        programs.check_claim(graph, dataclasses.replace(b, queue="h1", host="h1"))
    # a moved to another agent's queue: that agent (h2) refuses it.
    on_h2 = SignedPrograms(programs.store, key=KEY, allow=["*"], hosts=["h2"])
    graph2 = await on_h2.graph_for("r1")
    with pytest.raises(Refused, match="re-routed"):
        on_h2.check_claim(graph2, dataclasses.replace(a, queue="h2", host="h2"))
    # Not queued for this agent at all.
    with pytest.raises(Refused, match="does not serve"):
        programs.check_claim(graph, b)


async def test_a_reaper_checks_the_mac_but_not_the_host(signed: Any) -> None:
    _, programs, _, b = signed
    graph = await programs.graph_for("r1")
    programs.check_claim(graph, b, executing=False)
    with pytest.raises(Refused, match="MAC does not verify"):
        programs.check_claim(graph, dataclasses.replace(b, attempt=2), executing=False)


async def test_own_program_trusts_its_own_claims() -> None:
    graph = two_hosts()
    claim = Claim(id=1, run_id="r", step="a", sequence="0", recovery=0, attempt=7)
    OwnProgram(graph).check_claim(graph, claim)
