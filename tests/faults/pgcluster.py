"""A private Postgres cluster for outages: started by the tests, never the shared server.

:class:`PrivateCluster` runs ``initdb`` once per test session into a fresh temporary
directory and serves it on a spare loopback port with ``pg_ctl``. The tests stop, start and
restart it at will (:meth:`~PrivateCluster.stop`, :meth:`~PrivateCluster.start`,
:meth:`~PrivateCluster.restart`, :meth:`~PrivateCluster.down_for`), so the shared server on
5432, which other suites and engineers use, is never touched.

``initdb`` and the server refuse to run as root: as root (CI), both run as the ``postgres``
OS user through ``runuser``, on a directory that user owns. The binaries are the newest
under ``/usr/lib/postgresql/*/bin`` (Debian's layout), else those on ``PATH``.
Authentication is ``trust`` for the ``postgres`` role on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: Seconds pg_ctl may take to start or stop the server.
PG_CTL_TIMEOUT = 60

#: Settings for a disposable test server: no durability, enough connections for a few
#: agents' pools, quick shutdowns.
SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
log_min_messages = warning
"""


class ClusterUnavailable(Exception):
    """Postgres binaries, or the user to run them as, are missing."""


def find_bin_dir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl`` (raises :class:`ClusterUnavailable`)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    for directory in reversed(candidates):
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).parent
    raise ClusterUnavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """One Postgres cluster in a temporary directory, owned by the test session.

    Args:
        bin_dir: where ``initdb``, ``pg_ctl`` and ``postgres`` are.
    """

    user = "postgres"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        # As root, under /tmp itself: the postgres user must reach it, and $TMPDIR may be a
        # directory only root can enter.
        parent = "/tmp" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="aeventor-pg-", dir=parent))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._runas: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(self.user)
            except KeyError:
                raise ClusterUnavailable(
                    "running as root, and there is no 'postgres' OS user to run initdb as"
                ) from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._runas = ["runuser", "-u", self.user, "--"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    # -- sync, for the session fixture ------------------------------------------------------

    def _ctl_argv(self, action: str) -> list[str]:
        argv = [*self._runas, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-w"]
        argv += ["-t", str(PG_CTL_TIMEOUT)]
        if action in ("start", "restart"):
            # The server's output goes to the log, never to pg_ctl's own stdout: the server
            # would hold that pipe open for ever, and a caller reading it to the end hangs.
            argv += ["-l", str(self.log)]
        if action == "start":
            return [*argv, "start"]
        # fast: active transactions are rolled back and clients disconnected at once.
        return [*argv, "-m", "fast", action]

    def init(self) -> None:
        """``initdb`` the cluster and configure it (once per session)."""
        subprocess.run(
            [*self._runas, str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", self.user,
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, timeout=PG_CTL_TIMEOUT,
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(SETTINGS.format(port=self.port, socket_dir=self.root))

    def start_sync(self) -> None:
        subprocess.run(
            self._ctl_argv("start"), check=True, capture_output=True, timeout=PG_CTL_TIMEOUT + 10
        )

    def destroy(self) -> None:
        """Stop the server if it runs, and delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            # Best effort: the directory goes either way, and a server left running on it
            # exits on its own once its data directory is gone.
            subprocess.run(
                self._ctl_argv("stop"), check=False, capture_output=True, timeout=PG_CTL_TIMEOUT
            )
        shutil.rmtree(self.root, ignore_errors=True)

    # -- async, for the tests -----------------------------------------------------------------

    async def _ctl(self, action: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._ctl_argv(action),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(PG_CTL_TIMEOUT + 10):
                output, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl {action} failed ({proc.returncode}): {output.decode()}")

    async def stop(self) -> None:
        """Stop the server (fast: clients are disconnected, open transactions roll back)."""
        await self._ctl("stop")

    async def start(self) -> None:
        """Start the server and return once it accepts connections."""
        await self._ctl("start")

    async def restart(self) -> None:
        await self._ctl("restart")

    async def is_up(self) -> bool:
        """Whether the server accepts connections now."""
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    async def down_for(self, seconds: float) -> None:
        """An outage: stop the server, keep it down for ``seconds``, start it again.

        The wait is the fault's length, chosen by the test, not a wait for something to
        happen.
        """
        await self.stop()
        try:
            await asyncio.sleep(seconds)
        finally:
            await self.start()

    async def admin(self, *statements: str) -> None:
        """Run statements (CREATE/DROP DATABASE) on the ``postgres`` database."""
        import asyncpg

        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=self.user, database="postgres", timeout=10
        )
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
