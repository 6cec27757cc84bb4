"""The exceptions aeventor raises.

Every exception has one root, :class:`AeventorError`, and the tree is shaped around what a
caller does about it:

- :class:`ConfigurationError`: the program or its configuration is wrong; fix the code or
  the config file (the message names the thing and the fix).
- :class:`DatabaseError`: the store failed; :class:`ConnectionLost` may be retried.
- :class:`ExecutorError`: a step could not be launched or supervised.

Driver exceptions (asyncpg, aiosqlite, aiomysql, SQLAlchemy, asyncssh) never leak: each
backend translates them at its edge and chains the original as ``__cause__``.

.. versionadded:: 0.1
"""

from __future__ import annotations

__all__ = (
    "AeventorError",
    "ConfigurationError",
    "ConnectionLost",
    "DatabaseError",
    "ExecTimeout",
    "ExecutorError",
    "HostUnreachable",
    "NoResult",
    "ProgramDefinitionError",
    "SchemaVersionError",
    "SerializationError",
    "StoreConfigError",
    "UnguardedMainError",
    "UniqueViolation",
)


class AeventorError(Exception):
    """Root of every exception raised by aeventor."""


class ConfigurationError(AeventorError):
    """The program, its arguments or the configuration are wrong."""


class ProgramDefinitionError(ConfigurationError):
    """An event, step, association or trigger is defined wrongly."""


class SerializationError(ConfigurationError):
    """A step argument or return value cannot be carried as JSON."""


class StoreConfigError(ConfigurationError):
    """A store URL, a named store or its encrypted password cannot be resolved."""


class UnguardedMainError(ConfigurationError):
    """The user's script ran the program at import time inside a step subprocess."""


class DatabaseError(AeventorError):
    """The store failed to carry out an operation."""


class ConnectionLost(DatabaseError):
    """The connection to the database server was lost; the operation may be retried."""


class UniqueViolation(DatabaseError):
    """A row would duplicate one that exists.

    Args:
        constraint: the name of the violated constraint, when the driver tells it.
    """

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class NoResult(DatabaseError):
    """A row that must exist does not (an unknown run id, for example)."""


class SchemaVersionError(DatabaseError):
    """The database schema is newer than this aeventor, or cannot be upgraded."""


class ExecutorError(AeventorError):
    """A step could not be launched or supervised."""


class ExecTimeout(ExecutorError):
    """A step ran past its timeout and was terminated."""


class HostUnreachable(ExecutorError):
    """The host a step is assigned to cannot be reached."""
