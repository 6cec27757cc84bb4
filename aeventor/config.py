"""Named stores, read from a TOML config file, with Fernet-encrypted passwords.

A store is the SQL database a run's state lives in. Instead of spelling out a URL (and its
password) on every command line, name it in the config file::

    [stores.prod]
    url = "postgresql+asyncpg://app@db.example:5432/prod"   # no password in the URL
    password = "gAAAAAB..."                                   # Fernet token, optional

    [stores.local]
    url = "sqlite+aiosqlite:////var/lib/aeventor/local.db"

Where things are looked up:

- The config file: ``$AEVENTOR_CONFIG`` if set, else ``$XDG_CONFIG_HOME/aeventor/config.toml``
  (``~/.config/aeventor/config.toml`` when ``XDG_CONFIG_HOME`` is unset).
- The key: ``$AEVENTOR_KEY`` (a url-safe base64 Fernet key) if set, else the key file
  ``$AEVENTOR_KEY_FILE`` if set, else ``$XDG_CONFIG_HOME/aeventor/key``. The key file must
  not be readable or writable by group or others (``chmod 600``).

Create a key with ``python -m aeventor.config genkey`` and encrypt a password with
``python -m aeventor.config encrypt`` (it reads the password from stdin).

A plaintext password never appears in a ``str()``, a ``repr()`` or an exception message
raised here: :class:`StoreURL` renders its password as ``***``.

The functions here read small files synchronously; call them from ``async`` code through
:func:`asyncio.to_thread`.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from aeventor.exceptions import StoreConfigError

__all__ = (
    "CONFIG_ENV",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "StoreEntry",
    "StoreURL",
    "StoresConfig",
    "decrypt_password",
    "default_config_path",
    "default_key_path",
    "encrypt_password",
    "generate_key",
    "is_store_name",
    "load_config",
    "load_key",
    "main",
    "resolve_store",
    "write_key_file",
)

CONFIG_ENV: Final = "AEVENTOR_CONFIG"
"""Environment variable naming the config file."""

KEY_ENV: Final = "AEVENTOR_KEY"
"""Environment variable holding the Fernet key itself."""

KEY_FILE_ENV: Final = "AEVENTOR_KEY_FILE"
"""Environment variable naming the key file."""

_STORE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_STORE_KEYS: Final = frozenset({"url", "password"})
_TOP_LEVEL_KEYS: Final = frozenset({"stores"})
_GENKEY_HINT: Final = "`aeventor config genkey` (or `python -m aeventor.config genkey`)"
_ENCRYPT_HINT: Final = "`aeventor config encrypt` (or `python -m aeventor.config encrypt`)"


def is_store_name(value: str) -> bool:
    """Tell whether ``value`` names a store rather than being a URL or a path.

    A store name starts with a letter or ``_`` and continues with letters, digits, ``_`` or
    ``-``. It has no ``.``, ``/`` or ``:``, so ``prod`` is a name while ``./prod.db`` and
    ``sqlite:///prod.db`` are not.

    Args:
        value: what the user passed where a store is expected.

    Returns:
        ``True`` if ``value`` is to be looked up in the config file.

    .. versionadded:: 0.1
    """
    return _STORE_NAME.fullmatch(value) is not None


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _config_home(environ: Mapping[str, str]) -> Path:
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    home = environ.get("HOME", "")
    return (Path(home) if home else Path.home()) / ".config"


def default_config_path(*, environ: Mapping[str, str] | None = None) -> Path:
    """Return where the config file is looked up.

    Args:
        environ: the environment to read; defaults to :data:`os.environ`.

    Returns:
        ``$AEVENTOR_CONFIG`` if set and not empty, else
        ``$XDG_CONFIG_HOME/aeventor/config.toml`` (``~/.config`` when unset).

    .. versionadded:: 0.1
    """
    env = _environ(environ)
    explicit = env.get(CONFIG_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    return _config_home(env) / "aeventor" / "config.toml"


def default_key_path(*, environ: Mapping[str, str] | None = None) -> Path:
    """Return where the key file is looked up.

    Args:
        environ: the environment to read; defaults to :data:`os.environ`.

    Returns:
        ``$AEVENTOR_KEY_FILE`` if set and not empty, else ``$XDG_CONFIG_HOME/aeventor/key``
        (``~/.config`` when unset).

    .. versionadded:: 0.1
    """
    env = _environ(environ)
    explicit = env.get(KEY_FILE_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    return _config_home(env) / "aeventor" / "key"


# --- keys and passwords ---------------------------------------------------------------------


def generate_key() -> str:
    """Return a new Fernet key (url-safe base64, 44 characters).

    .. versionadded:: 0.1
    """
    return Fernet.generate_key().decode("ascii")


def write_key_file(path: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Path:
    """Create a key file holding a new key, readable by its owner only (mode 0600).

    The file is created atomically with ``O_CREAT | O_EXCL``; an existing file is never
    overwritten, because the passwords encrypted with the old key would become unreadable.
    A missing parent directory is created with mode 0700.

    Args:
        path: the file to create; defaults to :func:`default_key_path`.
        environ: the environment used to find the default path; defaults to
            :data:`os.environ`.

    Returns:
        The path of the new key file.

    Raises:
        StoreConfigError: the file exists already or cannot be created.

    .. versionadded:: 0.1
    """
    target = path if path is not None else default_key_path(environ=environ)
    key = generate_key()
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise StoreConfigError(
            f"key file {target} already exists; refusing to overwrite it because the "
            "passwords encrypted with it could no longer be decrypted. Keep it, or move it "
            "away yourself if you really want a new key."
        ) from None
    except OSError as exc:
        raise StoreConfigError(
            f"cannot create key file {target}: {exc.strerror}; choose another path with "
            f"--key-file or ${KEY_FILE_ENV}"
        ) from exc
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(key + "\n")
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise StoreConfigError(f"cannot write key file {target}: {exc.strerror}") from exc
    return target


def _check_key(key: bytes, *, source: str) -> bytes:
    try:
        Fernet(key)
    except ValueError:  # binascii.Error is a ValueError too
        # Never echo the key: it is the secret.
        raise StoreConfigError(
            f"{source} is not a valid Fernet key (32 url-safe base64-encoded "
            f"bytes); create one with {_GENKEY_HINT}"
        ) from None
    return key


def load_key(*, environ: Mapping[str, str] | None = None) -> bytes:
    """Load the Fernet key from ``$AEVENTOR_KEY`` or from the key file.

    Args:
        environ: the environment to read; defaults to :data:`os.environ`.

    Returns:
        The key, as the bytes :class:`cryptography.fernet.Fernet` takes.

    Raises:
        StoreConfigError: there is no key, the key is malformed, or the key file can be
            read by group or others.

    .. versionadded:: 0.1
    """
    env = _environ(environ)
    from_env = env.get(KEY_ENV, "").strip()
    if from_env:
        return _check_key(from_env.encode("ascii", "replace"), source=f"the key in ${KEY_ENV}")

    path = default_key_path(environ=env)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise StoreConfigError(
            f"no key to decrypt store passwords: ${KEY_ENV} is not set and the key file "
            f"{path} does not exist (set ${KEY_FILE_ENV} to use another file). Create one "
            f"with {_GENKEY_HINT}."
        ) from None
    except OSError as exc:
        raise StoreConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
    # Windows has no POSIX permission bits worth checking.
    if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o077:
        raise StoreConfigError(
            f"key file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); restrict it with `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise StoreConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
    return _check_key(data, source=f"the key in key file {path}")


def _fernet(key: bytes) -> Fernet:
    return Fernet(_check_key(key, source="the key given"))


def encrypt_password(password: str, *, key: bytes) -> str:
    """Encrypt a store password into a Fernet token for the config file.

    Args:
        password: the plaintext password.
        key: the Fernet key (see :func:`load_key`).

    Returns:
        The token, to put in ``password = "..."`` under the store's table.

    Raises:
        StoreConfigError: ``key`` is not a valid Fernet key.

    .. versionadded:: 0.1
    """
    return _fernet(key).encrypt(password.encode("utf-8")).decode("ascii")


def decrypt_password(token: str, *, key: bytes, store: str) -> str:
    """Decrypt a store password encrypted with :func:`encrypt_password`.

    Args:
        token: the Fernet token from the config file.
        key: the Fernet key (see :func:`load_key`).
        store: the store's name, for error messages.

    Returns:
        The plaintext password.

    Raises:
        StoreConfigError: the key does not match, or the token is corrupt.

    .. versionadded:: 0.1
    """
    try:
        plaintext = _fernet(key).decrypt(token.encode("ascii", "replace"))
        return plaintext.decode("utf-8")
    except (InvalidToken, UnicodeDecodeError):
        raise StoreConfigError(
            f"cannot decrypt the password of store {store!r}: the key does not match the one "
            "the password was encrypted with (or the token is damaged). Use that key "
            f"(${KEY_ENV} or the key file), or encrypt the password again with {_ENCRYPT_HINT} "
            "and replace the store's `password`."
        ) from None


# --- the config file -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StoreEntry:
    """One ``[stores.NAME]`` table of the config file.

    Attributes:
        name: the store's name.
        url: the URL, without a password.
        password_token: the encrypted password (a Fernet token), or ``None``.

    .. versionadded:: 0.1
    """

    name: str
    url: URL
    password_token: str | None = field(default=None, repr=False)

    @property
    def has_password(self) -> bool:
        """Whether the store has an encrypted password."""
        return self.password_token is not None


@dataclass(frozen=True, kw_only=True)
class StoresConfig:
    """The parsed config file.

    Attributes:
        path: the file that was read (or would have been, if it does not exist).
        exists: whether the file exists; a missing file reads as no stores.
        stores: the stores by name.

    .. versionadded:: 0.1
    """

    path: Path
    exists: bool
    stores: Mapping[str, StoreEntry]

    @property
    def names(self) -> tuple[str, ...]:
        """The store names, sorted."""
        return tuple(sorted(self.stores))


@dataclass(frozen=True, kw_only=True, repr=False)
class StoreURL:
    """A resolved store: its URL, password included, that never shows the password.

    ``str()`` and ``repr()`` render the password as ``***``; pass :attr:`url` to
    :func:`sqlalchemy.ext.asyncio.create_async_engine`.

    Attributes:
        name: the store's name.
        url: the SQLAlchemy URL, with the decrypted password.

    .. versionadded:: 0.1
    """

    name: str
    url: URL

    def __str__(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"StoreURL(name={self.name!r}, url={str(self)!r})"


def _parse_store(name: str, table: object, *, path: Path) -> StoreEntry:
    where = f"store {name!r} in {path}"
    if not is_store_name(name):
        raise StoreConfigError(
            f"{where}: the name is not a valid store name; use letters, digits, '_' and '-' "
            "only, starting with a letter or '_'"
        )
    if not isinstance(table, dict):
        raise StoreConfigError(f"{where}: expected a table [stores.{name}] with a `url` key")
    unknown = sorted(set(table) - _STORE_KEYS)
    if unknown:
        raise StoreConfigError(
            f"{where}: unknown key {unknown[0]!r}; the allowed keys are "
            f"{', '.join(sorted(_STORE_KEYS))}"
        )
    raw_url = table.get("url")
    if raw_url is None:
        raise StoreConfigError(f"{where}: missing key 'url'; add url = \"dialect+driver://...\"")
    if not isinstance(raw_url, str) or not raw_url:
        raise StoreConfigError(f"{where}: key 'url' must be a non-empty string")
    token = table.get("password")
    if token is not None and (not isinstance(token, str) or not token):
        raise StoreConfigError(
            f"{where}: key 'password' must be a Fernet token string from {_ENCRYPT_HINT}"
        )
    try:
        url = make_url(raw_url)
    except (ArgumentError, ValueError):
        # The URL is not echoed and the cause is dropped: a plaintext password may be in it
        # (a bad port raises ValueError quoting the port text, for example).
        raise StoreConfigError(
            f"{where}: key 'url' is not a valid SQLAlchemy URL; expected "
            "dialect+driver://user@host:port/database"
        ) from None
    if url.password is not None:
        raise StoreConfigError(
            f"{where}: the url contains a password; remove it from the url and put the "
            f"password, encrypted with {_ENCRYPT_HINT}, in key 'password'"
        )
    return StoreEntry(name=name, url=url, password_token=token)


def load_config(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> StoresConfig:
    """Read and check the config file.

    A missing file reads as a config with no stores (``exists=False``); resolving a store
    from it fails in :func:`resolve_store`.

    Args:
        path: the config file; defaults to :func:`default_config_path`.
        environ: the environment used to find the default path; defaults to
            :data:`os.environ`.

    Returns:
        The parsed stores.

    Raises:
        StoreConfigError: the file cannot be read, is not valid TOML, or a store entry is
            wrong (missing ``url``, unknown key, bad URL, plaintext password).

    .. versionadded:: 0.1
    """
    target = path if path is not None else default_config_path(environ=environ)
    try:
        with target.open("rb") as file:
            document: dict[str, Any] = tomllib.load(file)
    except FileNotFoundError:
        return StoresConfig(path=target, exists=False, stores=MappingProxyType({}))
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line N, column M)" and never quotes the source text.
        raise StoreConfigError(f"config file {target} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise StoreConfigError(f"cannot read config file {target}: {exc.strerror}") from exc

    unknown = sorted(set(document) - _TOP_LEVEL_KEYS)
    if unknown:
        raise StoreConfigError(
            f"config file {target}: unknown top-level key {unknown[0]!r}; stores go in "
            "[stores.NAME] tables"
        )
    raw_stores = document.get("stores", {})
    if not isinstance(raw_stores, dict):
        raise StoreConfigError(
            f"config file {target}: 'stores' must be a table of [stores.NAME] tables"
        )
    stores = {name: _parse_store(name, table, path=target) for name, table in raw_stores.items()}
    return StoresConfig(path=target, exists=True, stores=MappingProxyType(stores))


def resolve_store(
    name: str,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> StoreURL:
    """Look a store up by name and return its URL with the decrypted password.

    The key is only loaded when the store has a password.

    Args:
        name: the store's name (see :func:`is_store_name`).
        config_path: the config file; defaults to :func:`default_config_path`.
        environ: the environment to read paths and the key from; defaults to
            :data:`os.environ`.

    Returns:
        The store's URL, whose ``str()`` and ``repr()`` hide the password.

    Raises:
        StoreConfigError: the config file is missing or wrong, the store is unknown, or its
            password cannot be decrypted.

    .. versionadded:: 0.1
    """
    config = load_config(config_path, environ=environ)
    if not config.exists:
        raise StoreConfigError(
            f"cannot resolve store {name!r}: the config file {config.path} does not exist. "
            f"Create it with a [stores.{name}] table, or set ${CONFIG_ENV} to your config file."
        )
    entry = config.stores.get(name)
    if entry is None:
        known = ", ".join(config.names) if config.names else "(none)"
        raise StoreConfigError(
            f"unknown store {name!r} in {config.path}; known stores: {known}. "
            f"Use one of them or add a [stores.{name}] table."
        )
    if entry.password_token is None:
        return StoreURL(name=name, url=entry.url)
    key = load_key(environ=environ)
    password = decrypt_password(entry.password_token, key=key, store=name)
    return StoreURL(name=name, url=entry.url.set(password=password))


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """``python -m aeventor.config``: the ``aeventor config`` command (genkey, encrypt).

    Args:
        argv: the arguments, without the program name; defaults to ``sys.argv[1:]``.
        environ: the environment to read paths and the key from; defaults to
            :data:`os.environ`.

    Returns:
        The exit code: 0 on success, 2 on a configuration error.

    .. versionadded:: 0.1
    """
    from .cli import main as cli_main

    return cli_main(["config", *(sys.argv[1:] if argv is None else argv)], environ=environ)


if __name__ == "__main__":
    sys.exit(main())
