"""Tests for named stores and their encrypted passwords (aeventor.config)."""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import traceback
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography.fernet import Fernet

from aeventor.config import (
    StoreURL,
    decrypt_password,
    default_config_path,
    default_key_path,
    encrypt_password,
    generate_key,
    is_store_name,
    load_config,
    load_key,
    main,
    resolve_store,
    write_key_file,
)
from aeventor.exceptions import StoreConfigError

SECRET = "hunter2-Pl@in/text:pw"
SECRET_FORMS = (SECRET, quote(SECRET, safe=""), "hunter2")

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for form in SECRET_FORMS:
            assert form not in text


def assert_exc_has_no_secret(exc: BaseException) -> None:
    assert_no_secret(str(exc), repr(exc), "".join(traceback.format_exception(exc)))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose config directory is inside tmp_path, with no key."""
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


@pytest.fixture
def key() -> bytes:
    return Fernet.generate_key()


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- names and paths -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["prod", "_x", "Prod-2", "a_b-c", "A"])
def test_is_store_name_accepts_names(value: str) -> None:
    assert is_store_name(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "2prod",
        "-prod",
        "prod.db",
        "./prod",
        "/var/lib/x.db",
        "sqlite:///x.db",
        "postgresql+asyncpg://u@h/db",
        "prod\n",
        "pr od",
    ],
)
def test_is_store_name_rejects_urls_and_paths(value: str) -> None:
    assert not is_store_name(value)


def test_default_paths_use_xdg_config_home(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path), "HOME": "/nonexistent"}
    assert default_config_path(environ=environ) == tmp_path / "aeventor" / "config.toml"
    assert default_key_path(environ=environ) == tmp_path / "aeventor" / "key"


def test_default_paths_fall_back_to_home_and_ignore_relative_xdg(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": "relative/dir", "HOME": str(tmp_path)}
    assert default_config_path(environ=environ) == tmp_path / ".config/aeventor/config.toml"
    assert default_key_path(environ=environ) == tmp_path / ".config/aeventor/key"


def test_default_paths_env_overrides(tmp_path: Path, env: dict[str, str]) -> None:
    env |= {"AEVENTOR_CONFIG": str(tmp_path / "c.toml"), "AEVENTOR_KEY_FILE": str(tmp_path / "k")}
    assert default_config_path(environ=env) == tmp_path / "c.toml"
    assert default_key_path(environ=env) == tmp_path / "k"


# --- keys and passwords --------------------------------------------------------------------


def test_generate_key_is_a_fernet_key() -> None:
    key = generate_key()
    Fernet(key.encode())
    assert key != generate_key()


def test_encrypt_decrypt_round_trip(key: bytes) -> None:
    token = encrypt_password(SECRET, key=key)
    assert_no_secret(token)
    assert decrypt_password(token, key=key, store="prod") == SECRET


def test_decrypt_with_wrong_key_names_store(key: bytes) -> None:
    token = encrypt_password(SECRET, key=key)
    with pytest.raises(StoreConfigError, match=r"'prod'.*does not match") as info:
        decrypt_password(token, key=Fernet.generate_key(), store="prod")
    assert_exc_has_no_secret(info.value)


def test_decrypt_damaged_token(key: bytes) -> None:
    with pytest.raises(StoreConfigError, match="'prod'"):
        decrypt_password("not-a-token", key=key, store="prod")


def test_invalid_key_is_refused_without_echoing_it() -> None:
    bad = b"short-and-not-a-key"
    with pytest.raises(StoreConfigError, match="not a valid Fernet key") as info:
        encrypt_password(SECRET, key=bad)
    assert bad.decode() not in str(info.value)
    assert_exc_has_no_secret(info.value)


@posix_only
def test_write_key_file_creates_0600_file(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "sub" / "key")
    assert path == tmp_path / "sub" / "key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    Fernet(path.read_bytes().strip())


def test_write_key_file_default_path(env: dict[str, str], tmp_path: Path) -> None:
    path = write_key_file(environ=env)
    assert path == tmp_path / "xdg" / "aeventor" / "key"
    assert load_key(environ=env) == path.read_bytes().strip()


def test_write_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("existing\n")
    with pytest.raises(StoreConfigError, match="already exists") as info:
        write_key_file(path)
    assert str(path) in str(info.value)
    assert path.read_text() == "existing\n"


def test_load_key_from_env_takes_precedence(env: dict[str, str], key: bytes) -> None:
    write_key_file(environ=env)
    env["AEVENTOR_KEY"] = key.decode()
    assert load_key(environ=env) == key


def test_load_key_from_key_file_env(env: dict[str, str], tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "elsewhere")
    env["AEVENTOR_KEY_FILE"] = str(path)
    assert load_key(environ=env) == path.read_bytes().strip()


def test_load_key_missing_names_both_places_and_the_fix(
    env: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(StoreConfigError) as info:
        load_key(environ=env)
    message = str(info.value)
    assert "AEVENTOR_KEY" in message
    assert str(tmp_path / "xdg" / "aeventor" / "key") in message
    assert "genkey" in message


@posix_only
def test_load_key_refuses_group_readable_file(env: dict[str, str]) -> None:
    path = write_key_file(environ=env)
    path.chmod(0o644)
    with pytest.raises(StoreConfigError, match="0644") as info:
        load_key(environ=env)
    assert f"chmod 600 {path}" in str(info.value)


def test_load_key_invalid_env_key_not_echoed(env: dict[str, str]) -> None:
    env["AEVENTOR_KEY"] = "hunter2-not-a-key"
    with pytest.raises(StoreConfigError, match=r"AEVENTOR_KEY.*not a valid Fernet key") as info:
        load_key(environ=env)
    assert_exc_has_no_secret(info.value)


@posix_only
def test_load_key_invalid_key_file(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("garbage\n")
    path.chmod(0o600)
    env["AEVENTOR_KEY_FILE"] = str(path)
    with pytest.raises(StoreConfigError, match="not a valid Fernet key"):
        load_key(environ=env)


# --- config file ---------------------------------------------------------------------------


def test_load_config_missing_file_is_empty(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "absent.toml")
    assert not cfg.exists
    assert cfg.names == ()


def test_load_config_default_path(env: dict[str, str], tmp_path: Path) -> None:
    write_config(tmp_path / "xdg" / "aeventor" / "config.toml", '[stores.a]\nurl = "sqlite://"\n')
    cfg = load_config(environ=env)
    assert cfg.exists
    assert cfg.names == ("a",)


def test_load_config_parses_stores(tmp_path: Path, key: bytes) -> None:
    token = encrypt_password(SECRET, key=key)
    path = write_config(
        tmp_path / "c.toml",
        f"""
[stores.prod]
url = "postgresql+asyncpg://app@db.example:5432/prod"
password = "{token}"

[stores.local]
url = "sqlite+aiosqlite:////var/lib/aeventor/local.db"
""",
    )
    cfg = load_config(path)
    assert cfg.path == path
    assert cfg.names == ("local", "prod")
    prod = cfg.stores["prod"]
    assert prod.has_password
    assert prod.url.host == "db.example"
    assert prod.url.password is None
    assert token not in repr(prod)
    assert not cfg.stores["local"].has_password


def test_load_config_malformed_toml_names_path_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", '[stores.prod]\nurl "sqlite://"\n')
    with pytest.raises(StoreConfigError, match="line 2") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_malformed_toml_does_not_echo_secret(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml", f'[stores.prod]\nurl = "postgresql://u:{SECRET}@h/db\n'
    )
    with pytest.raises(StoreConfigError, match="not valid TOML") as info:
        load_config(path)
    assert_exc_has_no_secret(info.value)


def test_load_config_missing_url(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", '[stores.prod]\npassword = "x"\n')
    with pytest.raises(StoreConfigError, match=r"'prod'.*missing key 'url'") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_unknown_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", '[stores.prod]\nurl = "sqlite://"\nuser = "x"\n')
    with pytest.raises(StoreConfigError, match=r"'prod'.*unknown key 'user'"):
        load_config(path)


def test_load_config_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", '[store.prod]\nurl = "sqlite://"\n')
    with pytest.raises(StoreConfigError, match="unknown top-level key 'store'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('stores = "x"\n', "'stores' must be a table"),
        ('[stores]\nprod = "sqlite://"\n', "'prod'.*expected a table"),
        ('[stores."bad.name"]\nurl = "sqlite://"\n', "not a valid store name"),
        ("[stores.prod]\nurl = 3\n", "'url' must be a non-empty string"),
        ('[stores.prod]\nurl = "sqlite://"\npassword = 3\n', "'password' must be"),
    ],
)
def test_load_config_rejects_wrong_shapes(tmp_path: Path, text: str, match: str) -> None:
    path = write_config(tmp_path / "c.toml", text)
    with pytest.raises(StoreConfigError, match=match):
        load_config(path)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{quote(SECRET, safe='')}@host:notaport/db",
        f"postgresql://u@host:{quote(SECRET, safe='')}/db",
        f"not a url {SECRET}",
    ],
)
def test_load_config_malformed_url_does_not_echo_it(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "c.toml", f'[stores.prod]\nurl = "{url}"\n')
    with pytest.raises(StoreConfigError, match=r"'prod'.*not a valid SQLAlchemy URL") as info:
        load_config(path)
    assert_exc_has_no_secret(info.value)


def test_load_config_rejects_plaintext_password_in_url(tmp_path: Path) -> None:
    url = f"postgresql://u:{quote(SECRET, safe='')}@host/db"
    path = write_config(tmp_path / "c.toml", f'[stores.prod]\nurl = "{url}"\n')
    with pytest.raises(StoreConfigError, match=r"'prod'.*contains a password") as info:
        load_config(path)
    assert_exc_has_no_secret(info.value)


# --- resolve_store -------------------------------------------------------------------------


@pytest.fixture
def configured(tmp_path: Path, env: dict[str, str], key: bytes) -> Path:
    """A config file with an encrypted `prod` and a password-less `local` store."""
    env["AEVENTOR_KEY"] = key.decode()
    token = encrypt_password(SECRET, key=key)
    return write_config(
        tmp_path / "c.toml",
        f"""
[stores.prod]
url = "postgresql+asyncpg://app@db.example:5432/prod"
password = "{token}"

[stores.local]
url = "sqlite+aiosqlite:////var/lib/aeventor/local.db"
""",
    )


def test_resolve_store_inserts_decrypted_password(configured: Path, env: dict[str, str]) -> None:
    resolved = resolve_store("prod", config_path=configured, environ=env)
    assert resolved.name == "prod"
    assert resolved.url.password == SECRET
    assert resolved.url.username == "app"
    assert resolved.url.drivername == "postgresql+asyncpg"
    assert quote(SECRET, safe="") in resolved.url.render_as_string(hide_password=False)
    assert str(resolved) == "postgresql+asyncpg://app:***@db.example:5432/prod"
    assert_no_secret(str(resolved), repr(resolved), f"{resolved}", f"{resolved!r}")
    assert_no_secret(str(resolved.url), repr(resolved.url))


def test_resolve_store_uses_default_config_path(
    configured: Path, env: dict[str, str], tmp_path: Path
) -> None:
    env["AEVENTOR_CONFIG"] = str(configured)
    assert resolve_store("prod", environ=env).url.password == SECRET


def test_resolve_store_without_password_needs_no_key(configured: Path, env: dict[str, str]) -> None:
    del env["AEVENTOR_KEY"]
    resolved = resolve_store("local", config_path=configured, environ=env)
    assert resolved.url.password is None
    assert resolved.url.database == "/var/lib/aeventor/local.db"


def test_store_url_is_frozen(configured: Path, env: dict[str, str]) -> None:
    resolved = resolve_store("prod", config_path=configured, environ=env)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.name = "other"  # type: ignore[misc]
    assert isinstance(resolved, StoreURL)


def test_resolve_store_unknown_lists_names_and_path(configured: Path, env: dict[str, str]) -> None:
    with pytest.raises(StoreConfigError, match="unknown store 'staging'") as info:
        resolve_store("staging", config_path=configured, environ=env)
    message = str(info.value)
    assert "local, prod" in message
    assert str(configured) in message


def test_resolve_store_missing_config_names_path_and_env_var(
    env: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(StoreConfigError, match="does not exist") as info:
        resolve_store("prod", environ=env)
    message = str(info.value)
    assert str(tmp_path / "xdg" / "aeventor" / "config.toml") in message
    assert "AEVENTOR_CONFIG" in message


def test_resolve_store_wrong_key(configured: Path, env: dict[str, str]) -> None:
    env["AEVENTOR_KEY"] = Fernet.generate_key().decode()
    with pytest.raises(StoreConfigError, match=r"'prod'.*does not match") as info:
        resolve_store("prod", config_path=configured, environ=env)
    assert_exc_has_no_secret(info.value)


def test_resolve_store_missing_key(configured: Path, env: dict[str, str]) -> None:
    del env["AEVENTOR_KEY"]
    with pytest.raises(StoreConfigError, match="genkey") as info:
        resolve_store("prod", config_path=configured, environ=env)
    assert_exc_has_no_secret(info.value)


# --- command line --------------------------------------------------------------------------


def test_cli_genkey_writes_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k" / "key"
    assert main(["genkey", "--key-file", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    Fernet(path.read_bytes().strip())
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_cli_genkey_default_path(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["genkey"], environ=env) == 0
    assert (tmp_path / "xdg" / "aeventor" / "key").exists()


def test_cli_genkey_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "key"
    path.write_text("old\n")
    assert main(["genkey", "--key-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "already exists" in captured.err
    assert path.read_text() == "old\n"


def test_cli_encrypt_from_stdin(
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_path = tmp_path / "key"
    assert main(["genkey", "--key-file", str(key_path)], environ=env) == 0
    capsys.readouterr()
    env["AEVENTOR_KEY_FILE"] = str(key_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
    assert main(["encrypt"], environ=env) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert_no_secret(captured.out, captured.err)
    assert decrypt_password(token, key=load_key(environ=env), store="prod") == SECRET


def test_cli_encrypt_uses_getpass_on_a_tty(
    env: dict[str, str],
    key: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    env["AEVENTOR_KEY"] = key.decode()
    monkeypatch.setattr("sys.stdin", Tty("must not be read"))
    monkeypatch.setattr("getpass.getpass", lambda prompt="": SECRET)
    assert main(["encrypt"], environ=env) == 0
    token = capsys.readouterr().out.strip()
    assert decrypt_password(token, key=key, store="x") == SECRET


def test_cli_encrypt_without_key_exits_2(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(SECRET))
    assert main(["encrypt"], environ=env) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "genkey" in captured.err
    assert_no_secret(captured.err)


def test_cli_encrypt_empty_password_exits_2(
    env: dict[str, str],
    key: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env["AEVENTOR_KEY"] = key.decode()
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["encrypt"], environ=env) == 2
    assert "no password" in capsys.readouterr().err


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
