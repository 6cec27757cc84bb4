"""``aeventor config genkey`` and ``aeventor config encrypt`` (also ``python -m aeventor.config``).

The key and the encrypted passwords of named stores; the library is :mod:`aeventor.config`.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Mapping
from pathlib import Path

from ..config import KEY_FILE_ENV, encrypt_password, load_key, write_key_file
from ..exceptions import StoreConfigError

__all__ = ("add_parsers",)

_PREFIX = "aeventor config"


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``config`` (``genkey``, ``encrypt``) under ``commands``."""
    parser = commands.add_parser(
        "config",
        help="keys and encrypted store passwords (genkey, encrypt)",
        description="Manage the key and the encrypted passwords of named stores.",
    )
    subcommands = parser.add_subparsers(
        title="commands", dest="config_command", required=True, metavar="COMMAND"
    )
    genkey = subcommands.add_parser(
        "genkey",
        help="write a new key file (mode 0600)",
        description="Write a new key file (mode 0600); it never overwrites one.",
    )
    genkey.add_argument(
        "--key-file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"where to write the key (default: ${KEY_FILE_ENV} or ~/.config/aeventor/key)",
    )
    genkey.set_defaults(handler=_genkey_command, error_prefix=_PREFIX)
    encrypt = subcommands.add_parser(
        "encrypt",
        help="read a password from stdin and print its token for the config file",
        description=(
            "Read a password from stdin (prompting on a terminal) and print its encrypted "
            "token for the store's `password` key in the config file."
        ),
    )
    encrypt.set_defaults(handler=_encrypt_command, error_prefix=_PREFIX)


def _read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    # Strip the line ending `echo` or a file adds, nothing else.
    return sys.stdin.read().rstrip("\r\n")


def _genkey_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    path = write_key_file(args.key_file, environ=environ)
    print(f"wrote a new key to {path}; back it up, it cannot be recovered")
    return 0


def _encrypt_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = load_key(environ=environ)
    password = _read_password()
    if not password:
        raise StoreConfigError("no password given on stdin; nothing to encrypt")
    print(encrypt_password(password, key=key))
    return 0
