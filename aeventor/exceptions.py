"""The exceptions aeventor raises.

Every exception has one root, :class:`AeventorError`, and the tree is shaped around what a
caller does about it:

- :class:`ConfigurationError`: the program or its configuration is wrong; fix the code or
  the config file (the message names the thing and the fix).
- :class:`DatabaseError`: the store failed. A :class:`TransientError` (a lost connection, a
  deadlock, a serialization failure, a lock wait timeout, a server out of connections) may
  succeed when tried again, and store operations retry it themselves; every other
  :class:`DatabaseError` fails at once (:class:`AuthenticationError`,
  :class:`StatementTimeout` and :class:`ValueTooLarge` among them: retrying cannot help).
- :class:`ExecutorError`: a step could not be launched or supervised.

Driver exceptions (asyncpg, aiosqlite, aiomysql, SQLAlchemy, asyncssh) never leak: each
backend translates them at its edge and chains the original as ``__cause__``.

.. versionadded:: 0.1
"""

from __future__ import annotations

__all__ = (
    "AeventorError",
    "AuthenticationError",
    "ConfigurationError",
    "ConnectionLost",
    "DatabaseError",
    "ExecTimeout",
    "ExecutorError",
    "HostUnreachable",
    "NoResult",
    "NothingToRecover",
    "ProgramChanged",
    "ProgramDefinitionError",
    "RecoveryRefused",
    "RunStillRunning",
    "SchemaVersionError",
    "SerializationError",
    "StatementTimeout",
    "StoreConfigError",
    "TransientError",
    "UnguardedMainError",
    "UniqueViolation",
    "ValueTooLarge",
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


class TransientError(DatabaseError):
    """A failure that trying the operation again may cure.

    A deadlock or serialization failure (the server rolled the transaction back), a lock
    wait timeout, a server with no connection left, or a lost connection
    (:class:`ConnectionLost`). Store operations retry these with back-off for up to the
    store's ``reconnect_deadline``, then re-raise the last one.

    .. versionadded:: 0.1
    """


class ConnectionLost(TransientError):
    """The connection to the database server was lost; the operation may be retried."""


class AuthenticationError(DatabaseError):
    """The database server refused the store's credentials (user, password or role).

    Never retried: the server is up and answered; the store URL or its password is wrong.

    .. versionadded:: 0.1
    """


class StatementTimeout(DatabaseError):
    """A statement ran past the store's ``statement_timeout`` and the server cancelled it.

    .. versionadded:: 0.1
    """


class ValueTooLarge(DatabaseError):
    """A value is larger than the store can carry in one statement (MySQL's
    ``max_allowed_packet``).

    Args:
        size: the value's size in bytes, when known.
        limit: the store's limit in bytes, when known.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, size: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


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


class RecoveryRefused(AeventorError):
    """A run that cannot be recovered (or a step of it rerun) as asked; the message says why
    and what to do."""


class RunStillRunning(RecoveryRefused):
    """The run's controller, or a worker running its steps, is still alive (or another
    process recovered the run first): it is not abandoned."""


class NothingToRecover(RecoveryRefused):
    """The run succeeded, or every step run that did not succeed is to be skipped."""


class ProgramChanged(RecoveryRefused):
    """The program given is another version than the run's; pass ``force=True``
    (``--force``) to recover the run with it."""


class ExecutorError(AeventorError):
    """A step could not be launched or supervised."""


class ExecTimeout(ExecutorError):
    """A step ran past its timeout and was terminated."""


class HostUnreachable(ExecutorError):
    """The host a step is assigned to cannot be reached."""
