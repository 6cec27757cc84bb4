"""Store and executor backends, imported lazily by name.

:func:`open_store` turns what a user passes as ``store=`` into a :class:`~.base.Database`:
nothing (a sqlite file named after the program), ``":memory:"``, a path, a SQLAlchemy URL or
the name of a store in the config file.

Store options travel in the URL's query, where aeventor takes them out before the driver
sees the URL, or as keyword arguments of :func:`open_store`, which win:

- ``statement_timeout``: seconds any one statement may run before the server cancels it
  (default :data:`~.base.DEFAULT_STATEMENT_TIMEOUT`; ``0`` for none). Postgres and
  MariaDB/MySQL enforce it; sqlite waits for its write lock for its busy timeout instead.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ...exceptions import StoreConfigError

if TYPE_CHECKING:
    from .base import Database

__all__ = ("STORE_OPTIONS", "open_store", "resolve_url")

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


#: The options a store URL's query may carry (see the module docstring).
STORE_OPTIONS = ("statement_timeout",)

_UNSET: Any = object()


def open_store(
    store: str | URL | Path | None,
    *,
    program: str,
    poll_interval: float | None = None,
    statement_timeout: float | None = _UNSET,
) -> Database:
    """A (not yet opened) :class:`~.base.Database` for ``store``.

    Args:
        statement_timeout: seconds a statement may run (None or 0: no limit); default: the
            URL's ``statement_timeout`` option, else
            :data:`~.base.DEFAULT_STATEMENT_TIMEOUT`.

    Raises:
        StoreConfigError: for what :func:`resolve_url` refuses, and for a store option
            that is not a number of seconds.
    """
    url = resolve_url(store, program=program)
    url, options = _take_options(url)
    if statement_timeout is not _UNSET:
        options["statement_timeout"] = statement_timeout
    module_name = _BACKENDS[url.get_backend_name()][1]
    module = importlib.import_module(f"{__name__}.{module_name}")
    database: Database = module.backend_class(url=url, poll_interval=poll_interval, **options)
    return database


def _take_options(url: URL) -> tuple[URL, dict[str, Any]]:
    """Take aeventor's options out of the URL's query (the driver would refuse them)."""
    options: dict[str, Any] = {}
    for name in STORE_OPTIONS:
        if name not in url.query:
            continue
        raw = url.query[name]
        text = raw if isinstance(raw, str) else raw[-1]
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:  # also NaN
            raise StoreConfigError(
                f"store={url.render_as_string(hide_password=True)!r}: {name}={text!r} is "
                f"not a number of seconds; write e.g. ?{name}=30 (0 for no limit)"
            )
        options[name] = seconds or None
    return url.difference_update_query(STORE_OPTIONS), options
