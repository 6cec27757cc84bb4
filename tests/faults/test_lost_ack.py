"""Lost acknowledgements of the claim, started and complete transactions.

The store commits, and the client never hears it: the connection dies right after the
server executed the ``COMMIT`` (:class:`~.proxy.FaultProxy` on Postgres and MariaDB,
:class:`~.lostack.LostAckSqlite` on sqlite). The store retries the operation; it must
recognise its own earlier commit (fencing tokens) rather than, say, leaving the step run it
claimed ``active`` and unrun for ever.

Each test runs three process steps and cuts one chosen commit; the run must succeed with
each step executed exactly once and nothing left active. Every wait is bounded: a hang fails
the test at its deadline.

- ``started`` and ``complete``: a chain ``s0 -> s1 -> s2``. A completion also claims the
  next step run as it makes it (standalone runs, and agents serving its host).
- ``claim``: standalone, a chain's step runs are all claimed as they are made, never by
  ``Database.claim``; so that one is cut, the standalone runs of that case are three
  independent steps under ``max_concurrency=1``: the run's first transaction claims one,
  ``Database.claim`` takes the others as slots free up. Agents claim a chain's queued first
  step with ``Database.claim``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores import resolve_url
from tests.acceptance.agents import CLUSTER_KEY, Agents

from . import sql, steps
from .checks import (
    S,
    assert_exactly_once,
    assert_nothing_active,
    chain,
    describe,
    finish,
)
from .lostack import LostAckSqlite
from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(90)

#: Seconds a 3-step chain may take, fault and retry included (it takes about one).
RUN_DEADLINE = 20.0
#: Short leases: a recovery that waits on one still ends well within the deadline.
LEASE = 3.0

TRANSACTIONS = {"claim": sql.CLAIM, "started": sql.STARTED, "complete": sql.COMPLETE}
#: A standalone run's own first transaction too (the submitter goes direct in agents' tests).
STANDALONE = {"create": sql.CREATE_RUN, **TRANSACTIONS}
STEPS = ("s0", "s1", "s2")

Proxies = Callable[[str], Awaitable[tuple[FaultProxy, str]]]


def check_run(result: evr.RunResult) -> None:
    assert result.status is evr.RunStatus.success, describe(result)
    assert sorted((s.step, s.status) for s in result.steps) == [(s, S.success) for s in STEPS], (
        describe(result)
    )


def standalone(store: str, journal: Path, log_dir: Path, transaction: str) -> evr.Eventor:
    if transaction == "claim":
        return three_at_a_time(store, journal, log_dir)
    return chain(store, journal, log_dir=log_dir, lease=LEASE)


def three_at_a_time(store: str, journal: Path, log_dir: Path) -> evr.Eventor:
    """``s0``, ``s1``, ``s2`` fired together, run one at a time."""
    ev = evr.Eventor(name="one_by_one", store=store, log_dir=log_dir, lease=LEASE,
                     max_concurrency=1)  # fmt: skip
    start = ev.add_event("start")
    for name in STEPS:
        ev.add_step(name, func=steps.record, kwargs={"journal": str(journal), "name": name})
    ev.add_assoc(start, *STEPS)
    ev.trigger_event(start, 1)
    return ev


# -- standalone: `await ev.run()` through the proxy --------------------------------------------


@pytest.mark.parametrize("transaction", list(STANDALONE))
async def test_standalone_run_survives_lost_ack(
    server_store: str, proxies: Proxies, tmp_path: Path, transaction: str
) -> None:
    store = server_store
    proxy, via_proxy = await proxies(store)
    journal = tmp_path / "journal"
    ev = standalone(via_proxy, journal, tmp_path / "logs", transaction)
    async with ev:  # opened (and migrated) before the fault is armed
        cut = proxy.cut_after_commit(STANDALONE[transaction])
        handle = ev.start()
        result = await finish(handle, store=store, fault=cut, deadline=RUN_DEADLINE)
    assert cut.done.is_set(), f"the fault was never injected: {cut}"
    check_run(result)
    await assert_exactly_once(journal, STEPS)
    await assert_nothing_active(store)


# -- sqlite: the commit happens, then ConnectionLost ------------------------------------------


@pytest.mark.parametrize("transaction", list(STANDALONE))
async def test_sqlite_run_survives_lost_ack(tmp_path: Path, transaction: str) -> None:
    path = tmp_path / "store.db"
    journal = tmp_path / "journal"
    db = LostAckSqlite(url=resolve_url(str(path), program="chain"))
    await db.open()
    ev = standalone(str(path), journal, tmp_path / "logs", transaction)
    # The Eventor drives its runs through the store it holds (opened above).
    ev._db = db
    async with ev:
        cut = db.cut_after_commit(STANDALONE[transaction])
        handle = ev.start()
        result = await finish(handle, store=str(path), fault=cut, deadline=RUN_DEADLINE)
    assert cut.done.is_set(), f"the fault was never injected: {cut}"
    check_run(result)
    await assert_exactly_once(journal, STEPS)
    await assert_nothing_active(str(path))


# -- agents: their store URL goes through the proxy ---------------------------------------------


@pytest.mark.parametrize("transaction", list(TRANSACTIONS))
async def test_agents_survive_lost_ack(
    server_store: str, proxies: Proxies, agents: Agents, tmp_path: Path, transaction: str
) -> None:
    store = server_store
    proxy, via_proxy = await proxies(store)
    journal = tmp_path / "journal"
    # Two agents serve the chain's host through the proxy; the submitter goes direct.
    for _ in range(2):
        await agents.start(via_proxy, "h1", allow=["tests.faults.*"], args=["--lease", str(LEASE)])
    cut = proxy.cut_after_commit(TRANSACTIONS[transaction])
    ev = chain(
        store,
        journal,
        log_dir=tmp_path / "logs",
        host="h1",
        mode="distributed",
        cluster_key=CLUSTER_KEY,
    )
    async with ev:
        handle = ev.start()
        result = await finish(handle, store=store, fault=cut, deadline=RUN_DEADLINE)
    assert cut.done.is_set(), f"the fault was never injected: {cut}"
    check_run(result)
    await assert_exactly_once(journal, STEPS)
    await assert_nothing_active(store)
