"""The tables that hold every program and run; one database holds many of each.

Keys make duplicates impossible rather than merely avoided: a trigger is unique per
(run, event, sequence, recovery), a step run per (run, step, sequence, recovery, attempt).
All timestamps are timezone-aware UTC (microseconds on MySQL too).
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeDecorator

__all__ = (
    "HEAD_REVISION",
    "VERSION_TABLE",
    "agent",
    "delay",
    "metadata",
    "pool",
    "program",
    "run",
    "slot",
    "step_run",
    "trigger",
    "utcnow",
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (sqlite and MySQL store naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):  # type: ignore[no-untyped-def]
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is None:
            return None
        value = value.astimezone(UTC)
        if dialect.name != "postgresql":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


#: Text of any size: MySQL's TEXT holds only 64 KiB (results, errors and definitions do not fit).
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

# Autoincrementing 64-bit ids; sqlite only autoincrements INTEGER PRIMARY KEY.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

NAME = 200

#: The revision of the newest migration (``migrations/versions``): a store whose schema
#: is there opens without Alembic. A test checks it against Alembic's own head.
HEAD_REVISION = "0005"
#: aeventor's own version table (not ``alembic_version``: it can share a database with an
#: application that uses Alembic itself).
VERSION_TABLE = "aeventor_alembic_version"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

program = Table(
    "aeventor_program",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("name", String(NAME), nullable=False),
    Column("version", String(64), nullable=False),
    Column("definition", LongText, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    # HMAC of the definition with the cluster key (distributed mode).
    Column("signature", String(64), nullable=True),
    UniqueConstraint("name", "version"),
)

run = Table(
    "aeventor_run",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("program_id", _BigId, ForeignKey("aeventor_program.id"), nullable=False),
    Column("program_name", String(NAME), nullable=False),
    Column("status", String(16), nullable=False),
    # An unhandled step failure stopped the run: nothing new starts, running steps finish.
    Column("stopped", Boolean, nullable=False, default=False),
    Column("recovery", Integer, nullable=False, default=0),
    Column("reason", LongText, nullable=True),
    Column("created", UTCDateTime, nullable=False),
    Column("ended", UTCDateTime, nullable=True),
    # standalone: driven by the process that started it; distributed: by the host agents.
    Column("mode", String(16), nullable=False, server_default="standalone"),
    Column("submitted_by", String(NAME), nullable=True),
    # HMAC of (run id, program id, program version) with the cluster key.
    Column("signature", String(64), nullable=True),
    # The worker driving a standalone run (as aeventor_agent.id: host and pid), so that
    # recovery can tell whether it is still alive.
    Column("controller", String(NAME), nullable=True),
    # Where the run's logs are written (the controller's log_dir), for `aeventor logs`.
    Column("log_dir", String(1024), nullable=True),
    # How the current recovery generation treats step runs of earlier ones: "recover" keeps
    # those that succeeded, "rerun" runs what a rerun step triggers again.
    Column("replay", String(16), nullable=True),
    Index(None, "program_name", "created"),
    Index(None, "status"),
)

trigger = Table(
    "aeventor_trigger",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("aeventor_run.id"), nullable=False),
    Column("event", String(NAME), nullable=False),
    Column("sequence", String(NAME), nullable=False),
    Column("recovery", Integer, nullable=False, default=0),
    Column("created", UTCDateTime, nullable=False),
    # The unique key doubles as the index of the hot lookup: which of these events fired
    # for this run and sequence.
    UniqueConstraint("run_id", "sequence", "recovery", "event"),
)

step_run = Table(
    "aeventor_step_run",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("aeventor_run.id"), nullable=False),
    Column("step", String(NAME), nullable=False),
    Column("sequence", String(NAME), nullable=False),
    Column("recovery", Integer, nullable=False, default=0),
    Column("attempt", Integer, nullable=False, default=1),
    Column("status", String(16), nullable=False),
    # The host the step is assigned to (recorded in every mode).
    Column("host", String(NAME), nullable=True),
    # Who may claim it: the host's agents in distributed runs; None when the run's own
    # process drives it (standalone).
    Column("queue", String(NAME), nullable=True),
    # Who claimed it (a worker id), its process, and until when its lease holds.
    Column("worker", String(NAME), nullable=True),
    Column("pid", Integer, nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    # The fencing token of the current claim: a new one at every claim, so a worker whose
    # lease was taken cannot record anything over the new holder's (or the reaper's) outcome.
    Column("token", String(32), nullable=True),
    # HMAC (cluster key) over what decides what runs where: run, program version, step,
    # sequence, recovery, attempt, host and queue (distributed runs).
    Column("mac", String(64), nullable=True),
    Column("result", LongText, nullable=True),
    Column("error", LongText, nullable=True),
    Column("created", UTCDateTime, nullable=False),
    Column("started", UTCDateTime, nullable=True),
    Column("ended", UTCDateTime, nullable=True),
    # A ready step run is not claimed before this (on the server's clock): a retry's backoff.
    Column("not_before", UTCDateTime, nullable=True),
    UniqueConstraint("run_id", "step", "sequence", "recovery", "attempt"),
    # Claiming the ready rows of a run (standalone) and counting a run's pending rows.
    Index(None, "run_id", "status"),
    # Claiming the ready rows of a host's queue (agents). Partial where the server has
    # partial indexes, so a million finished rows cost nothing; MySQL indexes every row.
    Index(
        "ix_aeventor_step_run_queue_ready",
        "queue",
        "id",
        postgresql_where=sa.text("status = 'ready'"),
        sqlite_where=sa.text("status = 'ready'"),
    ),
    # Leases of active step runs: renewal by worker, expiry scans.
    Index(None, "status", "lease_until"),
    Index(None, "worker", "status"),
)

delay = Table(
    "aeventor_delay",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("aeventor_run.id"), nullable=False),
    Column("sequence", String(NAME), nullable=False),
    Column("recovery", Integer, nullable=False),
    # The event whose delayed association this is, and its target ("step" or "event").
    Column("event", String(NAME), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("target", String(NAME), nullable=False),
    # When the target is due (the server's clock), and when it was reached (None: pending).
    Column("due", UTCDateTime, nullable=False),
    Column("done", UTCDateTime, nullable=True),
    Column("created", UTCDateTime, nullable=False),
    UniqueConstraint("run_id", "sequence", "recovery", "event", "kind", "target"),
    # The due ones, for whoever reaches them; a run's pending ones.
    Index(None, "done", "due"),
    Index(None, "run_id", "done"),
)

#: One row per pool (see :mod:`aeventor.dispatch.pools`), locked by whoever counts its slots.
pool = Table(
    "aeventor_pool",
    metadata,
    Column("name", String(300), primary_key=True),
    #: The run a run-scoped pool belongs to (removed with it), else NULL.
    Column("run_id", String(36), nullable=True),
    Column("created", UTCDateTime, nullable=False),
    Index(None, "run_id"),
)

#: Slots of a pool wanted (``held`` false) or held by a step run, or (``step_run_id`` NULL)
#: kept by its run after the step run ended, for a later step to release.
slot = Table(
    "aeventor_slot",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("pool", String(300), nullable=False),
    Column("run_id", String(36), ForeignKey("aeventor_run.id"), nullable=False),
    Column("step_run_id", _BigId, nullable=True),
    Column("slots", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("held", Boolean, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Index(None, "pool", "held"),
    Index(None, "step_run_id"),
    Index(None, "run_id"),
)

agent = Table(
    "aeventor_agent",
    metadata,
    # host name and pid, as in step_run.worker
    Column("id", String(NAME), primary_key=True),
    Column("hostname", String(NAME), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("hosts", Text, nullable=False),
    Column("started", UTCDateTime, nullable=False),
    Column("heartbeat", UTCDateTime, nullable=False),
    Column("stopped", UTCDateTime, nullable=True),
    # The worker's own lease, on the database server's clock: its step runs are lost only
    # when both their lease and this one lapsed.
    Column("lease_until", UTCDateTime, nullable=True),
)
