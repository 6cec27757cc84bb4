"""Backends: stores (``stores/``: sqlite, Postgres, MySQL; all SQL lives there) and executors
(``executors/``: local processes and commands, in-loop coroutines, SSH).

Nothing is imported here, so a step process that imports an executor module does not pay for
SQLAlchemy.
"""
