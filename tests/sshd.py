"""Real OpenSSH servers on loopback for the SSH executor's tests.

:func:`ssh_hosts` (session-scoped) starts three ``sshd`` processes, on 127.0.0.2, 127.0.0.3
and 127.0.0.4, each on a free port, with a host key and a client key generated for the test
session, and a ``known_hosts`` file that trusts exactly that host key for those three
``[address]:port`` entries. Nothing listens beyond loopback.

``/usr/sbin/sshd`` comes from Debian's ``openssh-server``: when it is missing, it is installed
with apt-get if we are root; otherwise the tests are skipped with the command to install it
(never in CI, where a missing server fails the run).

Import the fixtures into a test module (``from tests.sshd import ssh_hosts, ssh_servers``):
only the root conftest may register plugins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from aeventor.backends.executors.ssh import SshTarget

SSHD = "/usr/sbin/sshd"
INSTALL_COMMAND = "apt-get install -y openssh-server"
IN_CI = os.environ.get("CI") == "true"
#: The servers: name -> loopback address.
ADDRESSES = {"s1": "127.0.0.2", "s2": "127.0.0.3", "s3": "127.0.0.4"}
#: Seconds an sshd may take to accept connections, or to exit when terminated.
START_DEADLINE = 20.0
#: Seconds ``apt-get`` may take.
APT_DEADLINE = 600.0
#: A policy-rc.d that tells Debian's maintainer scripts not to start services.
_NO_START_POLICY = "#!/bin/sh\nexit 101\n"


@dataclass
class SshServer:
    """One running sshd."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def accepted_logins(self) -> int:
        """How many SSH connections this server authenticated so far (from its log)."""
        return self.log().count("Accepted publickey for ")


@dataclass
class SshServers:
    """The test session's servers and the files that reach them."""

    servers: dict[str, SshServer]
    client_key: Path
    known_hosts: Path
    host_key: Path
    targets: dict[str, SshTarget] = field(default_factory=dict)


def _fail_or_skip(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=APT_DEADLINE,
        check=False,
    )


def ensure_sshd() -> str:
    """The path of sshd: install ``openssh-server`` if it is missing and we are root."""
    if os.path.exists(SSHD):
        return SSHD
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _fail_or_skip(f"{SSHD} is missing; install it with: sudo {INSTALL_COMMAND}")
    # Debian's maintainer scripts would start the system's sshd on port 22 of every
    # interface; a policy-rc.d that answers 101 stops them (Docker images ship one).
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text(_NO_START_POLICY)
        policy.chmod(0o755)
    try:
        done = _apt_get("install", "-y", "--no-install-recommends", "openssh-server")
        if done.returncode != 0:
            # A fresh container has no package lists yet.
            _apt_get("update")
            done = _apt_get("install", "-y", "--no-install-recommends", "openssh-server")
    finally:
        if added_policy:
            policy.unlink()
    if done.returncode != 0 or not os.path.exists(SSHD):
        _fail_or_skip(
            f"{INSTALL_COMMAND} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return SSHD


def _write_key_pair(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    path.chmod(0o600)  # sshd refuses host keys others can read
    return key


def write_known_hosts(path: Path, entries: Mapping[str, int], public_key: asyncssh.SSHKey) -> Path:
    """A known_hosts file trusting ``public_key`` for each ``[host]:port`` entry."""
    line = public_key.export_public_key("openssh").decode().strip()
    path.write_text("".join(f"[{host}]:{port} {line}\n" for host, port in entries.items()))
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _sshd_config(workdir: Path, name: str, host: str, port: int, host_key: Path) -> Path:
    config = workdir / f"sshd_config.{name}"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {host}:{port}",
                f"HostKey {host_key}",
                f"PidFile {workdir / f'sshd.{name}.pid'}",
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "StrictModes no",
                "UsePAM no",
                "AcceptEnv EVENTOR_* AEVENTOR_*",
                # INFO logs one "Accepted publickey" line per connection: the tests count
                # connections with it.
                "LogLevel INFO",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    return config


def _wait_accepting(server: SshServer, deadline: float) -> None:
    """Return once ``server`` accepts TCP connections; fail when it exits or the deadline passes."""
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"sshd {server.name} exited with {server.proc.returncode}: {server.log()}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection((server.host, server.port), timeout=1.0),
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"sshd {server.name} not accepting on {server.host}:{server.port} after "
                f"{START_DEADLINE} s: {server.log()}"
            )
        time.sleep(0.01)  # polling a condition with a deadline (sync fixture, no loop)


def _stop(server: SshServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=START_DEADLINE)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def running_sshds(workdir: Path) -> Iterator[SshServers]:
    """Start one sshd per :data:`ADDRESSES` entry under ``workdir``; stop them on exit."""
    sshd = ensure_sshd()
    # sshd's privilege separation directory.
    try:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    except PermissionError:
        _fail_or_skip("/run/sshd is missing; create it with: sudo mkdir -p /run/sshd")
    host_key = workdir / "host_ed25519"
    client_key = workdir / "client_ed25519"
    host = _write_key_pair(host_key)
    client = _write_key_pair(client_key)
    (workdir / "authorized_keys").write_bytes(client.export_public_key("openssh"))

    servers: dict[str, SshServer] = {}
    try:
        for name, address in ADDRESSES.items():
            port = _free_port(address)
            config = _sshd_config(workdir, name, address, port, host_key)
            log_path = workdir / f"sshd.{name}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            servers[name] = SshServer(name, address, port, proc, log_path)
        deadline = time.monotonic() + START_DEADLINE
        for server in servers.values():
            _wait_accepting(server, deadline)
        known_hosts = write_known_hosts(
            workdir / "known_hosts", {s.host: s.port for s in servers.values()}, host
        )
        result = SshServers(
            servers=servers, client_key=client_key, known_hosts=known_hosts, host_key=host_key
        )
        for name, server in servers.items():
            result.targets[name] = SshTarget(
                host=server.host,
                port=server.port,
                user="root" if os.geteuid() == 0 else None,
                client_keys=(str(client_key),),
                known_hosts=str(known_hosts),
                # The hosts share this machine's software (and this virtualenv).
                python=sys.executable,
            )
        yield result
    finally:
        for server in servers.values():
            _stop(server)


@pytest.fixture(scope="session")
def ssh_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServers]:
    """Three sshd servers on 127.0.0.2-4 for the whole test session."""
    with running_sshds(tmp_path_factory.mktemp("sshd")) as servers:
        yield servers


@pytest.fixture(scope="session")
def ssh_hosts(ssh_servers: SshServers) -> Mapping[str, SshTarget]:
    """``{"s1": SshTarget(...), "s2": ..., "s3": ...}``: how to reach each test server."""
    return ssh_servers.targets
