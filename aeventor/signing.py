"""Signed programs and runs: write access to the database alone must not run code.

An agent executes a step only if the program's definition carries a valid HMAC-SHA256 made
with the cluster key, the run carries one binding its id to that program's version, and the
step run carries one (:func:`step_run_mac`) binding it to that run, program version, step,
sequence, recovery, attempt, host and queue. Only holders of the cluster key (submitters and
agents) can make any of them. Step arguments are JSON, never unpickled, and a step's callable
must come from a module the agent allows.

The key: ``$AEVENTOR_CLUSTER_KEY`` (any string of 32+ characters), else the file
``$AEVENTOR_CLUSTER_KEY_FILE``, else ``$XDG_CONFIG_HOME/aeventor/cluster.key``; a key file must
not be accessible by group or others. ``aeventor config genkey --key-file PATH`` makes one.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .config import default_config_path
from .exceptions import ConfigurationError
from .program.model import ProgramDef

__all__ = (
    "CLUSTER_KEY_ENV",
    "CLUSTER_KEY_FILE_ENV",
    "definition_signature",
    "load_cluster_key",
    "program_signature",
    "run_signature",
    "step_run_mac",
    "step_run_signer",
    "verify",
)

CLUSTER_KEY_ENV = "AEVENTOR_CLUSTER_KEY"
CLUSTER_KEY_FILE_ENV = "AEVENTOR_CLUSTER_KEY_FILE"
_MIN_KEY = 32


def default_cluster_key_path(environ: Mapping[str, str]) -> Path:
    explicit = environ.get(CLUSTER_KEY_FILE_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    return (
        default_config_path(
            environ={k: v for k, v in environ.items() if k != "AEVENTOR_CONFIG"}
        ).parent
        / "cluster.key"
    )


def load_cluster_key(*, environ: Mapping[str, str] | None = None) -> bytes:
    """The cluster key.

    Raises:
        ConfigurationError: no key, a key too short, or a key file others can read.
    """
    env = os.environ if environ is None else environ
    value = env.get(CLUSTER_KEY_ENV, "").strip()
    source = f"${CLUSTER_KEY_ENV}"
    if not value:
        path = default_cluster_key_path(env)
        source = f"key file {path}"
        try:
            info = path.stat()
        except FileNotFoundError:
            raise ConfigurationError(
                f"distributed mode needs the cluster key: ${CLUSTER_KEY_ENV} is not set and "
                f"{path} does not exist (set ${CLUSTER_KEY_FILE_ENV} for another file). Create "
                f"it on every host with `aeventor config genkey --key-file {path}`"
            ) from None
        if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o077:
            raise ConfigurationError(
                f"cluster key file {path} is accessible by group or others; restrict it with "
                f"`chmod 600 {path}`"
            )
        value = path.read_text().strip()
    if len(value) < _MIN_KEY:
        raise ConfigurationError(
            f"the cluster key in {source} is too short ({len(value)} characters); use at "
            f"least {_MIN_KEY}, e.g. from `aeventor config genkey`"
        )
    return value.encode()


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()


def program_signature(key: bytes, program: ProgramDef) -> str:
    """The signature of a program's stored definition (its canonical JSON)."""
    return definition_signature(key, program.name, program.version, program.canonical_json())


def definition_signature(key: bytes, name: str, version: str, definition: str) -> str:
    return _mac(key, "program", name, version, definition)


def run_signature(key: bytes, *, run_id: str, program_id: int, version: str) -> str:
    return _mac(key, "run", run_id, str(program_id), version)


def step_run_mac(
    key: bytes,
    *,
    run_id: str,
    version: str,
    step: str,
    sequence: str,
    recovery: int,
    attempt: int,
    host: str | None,
    queue: str | None,
) -> str:
    """The MAC of a step run: exactly what decides what runs, and where.

    Made by the worker (or submitter) whose transaction creates the step run, verified by
    the agent that claims it. A row inserted without the key, copied from another step run
    (another run, sequence, recovery or attempt), or re-routed (host or queue changed) does
    not verify. The fields are encoded as a JSON array, so no choice of names or sequences
    can make two different step runs encode alike.
    """
    message = json.dumps(
        ["step-run", run_id, version, step, sequence, recovery, attempt, host, queue],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def step_run_signer(key: bytes) -> functools.partial[str]:
    """:func:`step_run_mac` with ``key`` bound: what a signing
    :class:`~aeventor.dispatch.Graph` is given (``Graph(program, signer=...)``)."""
    return functools.partial(step_run_mac, key)


def verify(expected: str | None, actual: str) -> bool:
    """Whether the stored signature ``expected`` is ``actual``, in constant time.

    A stored value is whatever the database holds: compared as UTF-8 bytes, since
    :func:`hmac.compare_digest` raises on strings with non-ASCII characters.
    """
    if expected is None:
        return False
    return hmac.compare_digest(expected.encode(errors="surrogatepass"), actual.encode())
