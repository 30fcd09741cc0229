"""A throwaway PostgreSQL server for tests, the chaos harness and the benchmarks.

It runs Debian's PostgreSQL binaries (``pg_config --bindir``, or ``PG_BINDIR``) on a free
loopback port with its data in a temporary directory. PostgreSQL refuses to run as root, so
when we are root every server command runs as the ``postgres`` user through ``runuser``.
``stop(mode="fast")`` followed by ``start()`` restarts it on the same port and data, which is
how the chaos harness restarts the database under load. ``standby()`` makes a streaming
standby of a running server (``pg_basebackup -R``): the read replica of the tests and benchmarks.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def find_bindir() -> Path:
    """Locates the directory of initdb/pg_ctl: $PG_BINDIR, pg_config, or the newest Debian one."""
    if env := os.environ.get("PG_BINDIR"):
        return Path(env)
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    raise RuntimeError("no PostgreSQL server binaries found: install postgresql or set PG_BINDIR")


# Ports handed out by this process: two picks in one test never collide with each other.
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that nothing listens on right now.

    They are taken below the kernel's ephemeral range: a port the kernel hands out (bind to port
    0) is also the source port of the next outgoing connection, so between our pick and the
    server's bind, any client connection could take it ("Address already in use"). Below the
    range only an explicit listener can.
    """
    top = _ephemeral_floor() - count
    rng = random.SystemRandom()
    for _ in range(1000):
        first = rng.randrange(10000, top)
        run = range(first, first + count)
        if not _handed_out.intersection(run) and all(_bindable(port) for port in run):
            _handed_out.update(run)
            return first
    raise RuntimeError(f"no {count} consecutive free loopback ports between 10000 and {top + count}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (see ``free_ports``)."""
    return free_ports(1)


@dataclass
class LocalPostgres:
    """One PostgreSQL server on 127.0.0.1, owned by this process."""

    port: int = field(default_factory=free_port)
    durable: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgtmp-")))

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def init(self) -> None:
        bindir = find_bindir()
        if os.geteuid() == 0:
            # The server user must be able to reach and own its data directory.
            self.base.chmod(0o755)
            shutil.chown(self.base, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                str(bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "300",
            "shared_buffers": "256MB",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",
        }
        if not self.durable:
            conf |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        conf |= self.settings
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())

    def start(self) -> None:
        if not self.datadir.exists():
            self.init()
        subprocess.run(
            self._as_owner(
                str(find_bindir() / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.base / "server.log"),
                # The port of this run: a data directory kept between runs (the bench's
                # TimescaleDB cache) was initialised with another one.
                "-o",
                f"-p {self.port}",
                "-w",
                "-t",
                "60",
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        subprocess.run(
            self._as_owner(
                str(find_bindir() / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"
            ),
            check=False,
            capture_output=True,
        )

    def standby(self, settings: dict[str, str] | None = None) -> LocalPostgres:
        """A streaming standby of this running server, on its own port and directory, started.

        ``pg_basebackup -R`` copies the data and writes the connection to the primary
        (``primary_conninfo``, ``standby.signal``); initdb's pg_hba already lets replication in
        from 127.0.0.1. The caller destroys it (before this server, or it waits for it)."""
        replica = LocalPostgres(durable=self.durable, settings=dict(settings or {}))
        if os.geteuid() == 0:
            replica.base.chmod(0o755)
            shutil.chown(replica.base, "postgres", "postgres")
        subprocess.run(
            replica._as_owner(
                str(find_bindir() / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-D",
                str(replica.datadir),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        # The copied postgresql.conf names the primary's socket directory: the standby's own.
        conf = {"unix_socket_directories": f"'{replica.base}'", "hot_standby": "on", **replica.settings}
        with (replica.datadir / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        try:
            replica.start()
        except BaseException:
            replica.destroy()
            raise
        return replica

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
