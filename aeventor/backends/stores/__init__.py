"""Store and executor backends, imported lazily by name.

:func:`open_store` turns what a user passes as ``store=`` into a :class:`~.base.Database`:
nothing (a sqlite file named after the program), ``":memory:"``, a path, a SQLAlchemy URL or
the name of a store in the config file.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ...exceptions import StoreConfigError

if TYPE_CHECKING:
    from .base import Database

__all__ = ("open_store", "resolve_url")

# Dialect -> (async driver, backend module). Sync drivers named in old programs (the design
# notes use mysql+mysqldb and postgresql+psycopg2) are replaced by the async one.
_BACKENDS = {
    "sqlite": ("aiosqlite", "sqlite"),
    "postgresql": ("asyncpg", "postgres"),
    "mysql": ("aiomysql", "mysql"),
    "mariadb": ("aiomysql", "mysql"),
}
_ASYNC_DRIVERS = {"aiosqlite", "asyncpg", "aiomysql", "asyncmy"}

# Everything between the scheme and the last "@" may be credentials.
_CREDENTIALS = re.compile(r"(://).*@")


def _redact(text: str) -> str:
    return _CREDENTIALS.sub(r"\1***@", text)


def resolve_url(store: str | URL | Path | None, *, program: str) -> URL:
    """The SQLAlchemy URL (async driver) for a ``store=`` argument.

    Raises:
        StoreConfigError: for an unparsable URL, an unsupported database, a missing
            directory or an unknown store name; the message never shows a password.
    """
    if store is None:
        return URL.create("sqlite+aiosqlite", database=str(Path.cwd() / f"{program}.run.db"))
    if isinstance(store, Path):
        return _sqlite_path(store)
    if isinstance(store, str):
        if store == ":memory:":
            return URL.create("sqlite+aiosqlite", database=":memory:")
        if "://" not in store:
            from ...config import is_store_name, resolve_store

            if is_store_name(store):
                return resolve_store(store).url
            return _sqlite_path(Path(store))
        try:
            url = make_url(store)
        except (ArgumentError, ValueError):
            raise StoreConfigError(
                f"store={_redact(store)!r} is not a database URL; write it as "
                "dialect+driver://user@host:port/database, e.g. "
                "postgresql+asyncpg://user@127.0.0.1:5432/db, or pass a sqlite file path"
            ) from None
    elif isinstance(store, URL):
        url = store
    else:
        raise StoreConfigError(
            f"store={type(store).__name__} object: pass a URL string, a path or a store name"
        )
    backend = url.get_backend_name()
    if backend not in _BACKENDS:
        raise StoreConfigError(
            f"store={url.render_as_string(hide_password=True)!r}: aeventor does not support "
            f"{backend!r} databases; use sqlite, postgresql or mysql/mariadb"
        )
    driver = url.get_driver_name()
    if driver not in _ASYNC_DRIVERS:
        url = url.set(drivername=f"{backend}+{_BACKENDS[backend][0]}")
    if backend == "sqlite" and url.database not in (None, "", ":memory:"):
        return _sqlite_path(Path(str(url.database)))
    return url


def _sqlite_path(path: Path) -> URL:
    path = path.expanduser()
    parent = path.resolve().parent
    if not parent.is_dir():
        raise StoreConfigError(
            f"store={str(path)!r}: directory {str(parent)!r} does not exist; create it "
            "or choose a sqlite file in an existing directory"
        )
    return URL.create("sqlite+aiosqlite", database=str(path.resolve()))


def open_store(
    store: str | URL | Path | None, *, program: str, poll_interval: float | None = None
) -> Database:
    """A (not yet opened) :class:`~.base.Database` for ``store``."""
    url = resolve_url(store, program=program)
    module_name = _BACKENDS[url.get_backend_name()][1]
    module = importlib.import_module(f"{__name__}.{module_name}")
    database: Database = module.backend_class(url=url, poll_interval=poll_interval)
    return database
