"""A replicated PostgreSQL on loopback: one etcd, PostgreSQL nodes under Patroni, and its faults.

``PatroniCluster`` starts etcd (its data in a temporary directory) and two PostgreSQL nodes
(Debian's binaries, ``tools.postgres.find_bindir``) each under its own Patroni, every port a
free one on 127.0.0.1. Patroni runs as the ``postgres`` user when we are root, as
``tools/postgres.py`` runs PostgreSQL: the server refuses to run as root. It waits for a leader
and a streaming standby, gives the multi-host DSN the api should use (``dsn``), and offers the
faults of a real deployment:

- ``kill_postmaster``: kill -9 of the primary's postmaster only. Patroni still holds the
  leader key and starts PostgreSQL again (crash recovery), no failover;
- ``kill_node``: kill -9 of Patroni and of every PostgreSQL process of a node (the host lost).
  The leader key expires after ``ttl`` and Patroni promotes the standby;
- ``switchover``: a planned switchover through Patroni's REST API;
- ``start_node``: a killed node started again; a former primary rejoins as a standby
  (``use_pg_rewind``: its diverged WAL is rewound to the new primary's timeline).

Replication is synchronous by default (``synchronous_mode: true``): a commit is acknowledged
only once the synchronous standby has flushed it, and Patroni promotes only that standby, so a
failover never loses an acknowledged commit. It is not *strict* by default: with two nodes,
``synchronous_mode_strict`` stops every write while either node is down (no standby to
acknowledge it), so the first failover would leave the new primary unwritable until the old one
rejoins. Without it, Patroni turns synchronous replication off while no standby is there, and
commits acknowledged in that degraded time are on one node only: losing that host too (a second
failure) loses them. ``strict=True`` is the setting for that promise, with three nodes to keep
writes going through the loss of one. ``synchronous=False`` is the asynchronous configuration:
a failover may lose commits the primary acknowledged but had not yet sent.

``close`` kills everything it started (Patroni, every PostgreSQL process, etcd) and removes the
temporary directory, also when the caller failed half-way; ``async with`` does it.

``python -m tools.chaos.patroni [--async] [--fault kill-node|kill-postmaster|switchover]``
starts a cluster, prints its DSN, and with ``--fault`` injects it once and reports how long no
node took writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tools.postgres import find_bindir, free_port

log = logging.getLogger("chaos.patroni")

SCOPE = "automation-ha"
TTL_S = 10
"""The leader key's lifetime: a primary whose Patroni vanished is replaced this long after its
last renewal. Patroni's default is 30 s; 10 s keeps a test short and still exceeds
``LOOP_WAIT_S + 2 * RETRY_TIMEOUT_S``, which Patroni needs so that a slow loop does not cost the
leader its key."""
LOOP_WAIT_S = 1
RETRY_TIMEOUT_S = 4
MISSING = (
    "{what} is not installed: the replicated database needs Debian's patroni and etcd-server "
    "(apt-get install -y --no-install-recommends patroni etcd-server; .ci/run installs them)"
)


def require_tools() -> tuple[str, str]:
    """The paths of patroni and etcd; fails saying how to install them (never a skip)."""
    patroni, etcd = shutil.which("patroni"), shutil.which("etcd")
    if patroni is None:
        raise RuntimeError(MISSING.format(what="patroni"))
    if etcd is None:
        raise RuntimeError(MISSING.format(what="etcd"))
    return patroni, etcd


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a PostgreSQL process (a pid read from a stale postmaster.pid may have
    been reused by anything)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"postgres")
    except OSError:
        return False


async def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """One HTTP call to a Patroni REST API (status, text); 0 when nothing answered."""

    def call() -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return int(answer.status), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    return await asyncio.to_thread(call)


async def _until(check: Any, timeout: float, what: str) -> Any:
    """Polls the coroutine function ``check`` until it returns a truthy value, or fails after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)  # poll interval of a condition wait


@dataclass
class Node:
    """One PostgreSQL server and the Patroni that runs it."""

    name: str
    base: Path
    pg_port: int = field(default_factory=free_port)
    rest_port: int = field(default_factory=free_port)
    patroni: asyncio.subprocess.Process | None = None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def config(self) -> Path:
        return self.base / "patroni.json"

    @property
    def log(self) -> Path:
        return self.base / "patroni.log"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def url(self, database: str = "postgres") -> str:
        """This node alone (a check of what it holds, whatever its role)."""
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/{database}"

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_postgres(pid) else None

    async def role(self) -> str:
        """``primary``, ``standby``, or ``down``, as its PostgreSQL answers."""
        try:
            conn = await asyncpg.connect(self.url(), timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return "down"
        try:
            return "standby" if await conn.fetchval("SELECT pg_is_in_recovery()", timeout=2) else "primary"
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return "down"
        finally:
            conn.terminate()


class PatroniCluster:
    """etcd and ``nodes`` PostgreSQL nodes under Patroni, on loopback, owned by this process."""

    def __init__(self, synchronous: bool = True, strict: bool = False, nodes: int = 2, base: Path | None = None):
        self.patroni_bin, self.etcd_bin = require_tools()
        self.synchronous = synchronous
        self.strict = strict
        self.base = base or Path(tempfile.mkdtemp(prefix="patroni-"))
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.etcd: asyncio.subprocess.Process | None = None
        self.nodes = [Node(f"pg{i}", self.base / f"pg{i}") for i in range(nodes)]

    @property
    def mode(self) -> str:
        return ("strict synchronous" if self.strict else "synchronous") if self.synchronous else "asynchronous"

    def dsn(self, database: str = "postgres") -> str:
        """Every node, and only the one that takes writes will do (what the api is given)."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    # -- start ------------------------------------------------------------------------------

    async def start(self, timeout: float = 90.0) -> Node:
        """etcd, then every node; returns the leader once a standby streams from it."""
        try:
            if os.geteuid() == 0:
                # Patroni and PostgreSQL run as postgres: they must reach and own their directories.
                self.base.chmod(0o755)
            await self._start_etcd()
            for node in self.nodes:
                node.base.mkdir(parents=True, exist_ok=True)
                if os.geteuid() == 0:
                    shutil.chown(node.base, "postgres", "postgres")
                node.config.write_text(json.dumps(self._config(node), indent=1))
                await self.start_node(node)
            return await self.wait_ready(timeout)
        except BaseException:
            await self.close()
            raise

    async def _start_etcd(self) -> None:
        data = self.base / "etcd"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        with (self.base / "etcd.log").open("wb") as out:
            self.etcd = await asyncio.create_subprocess_exec(
                self.etcd_bin,
                "--name=etcd0",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=etcd0={peer}",
                "--initial-cluster-state=new",
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=self.base,
            )

        async def healthy() -> bool:
            assert self.etcd is not None
            if self.etcd.returncode is not None:
                raise RuntimeError(f"etcd exited ({self.etcd.returncode}): {self._tail(self.base / 'etcd.log')}")
            status, text = await _http("GET", f"{client}/health", timeout=2)
            return status == 200 and '"true"' in text

        await _until(healthy, 30, "etcd to answer")

    def _config(self, node: Node) -> dict[str, Any]:
        """Patroni's configuration of ``node`` (YAML is a superset of JSON)."""
        trust = ["local all all trust", "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
        return {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{node.rest_port}", "connect_address": f"127.0.0.1:{node.rest_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_S,
                    "loop_wait": LOOP_WAIT_S,
                    "retry_timeout": RETRY_TIMEOUT_S,
                    # Any lag rules a standby out of an automatic failover in asynchronous mode
                    # only past 1 MiB (Patroni's default): the async run measures what that costs.
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": self.synchronous,
                    "synchronous_mode_strict": self.strict,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "max_connections": 200,
                            # The chaos checks time a rule's disable by its commit.
                            "track_commit_timestamp": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, {"auth": "trust"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}",
                "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.datadir),
                "bin_dir": str(find_bindir()),
                "pgpass": str(node.base / "pgpass"),
                "pg_hba": trust,
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "postgres"},
                    "rewind": {"username": "postgres"},
                },
                "parameters": {
                    "unix_socket_directories": str(node.base),
                    "log_min_messages": "warning",
                    "log_min_error_statement": "panic",
                },
            },
        }

    async def start_node(self, node: Node) -> None:
        """Starts ``node``'s Patroni; on a former primary it rejoins as a standby (pg_rewind)."""
        if node.patroni is not None and node.patroni.returncode is None:
            raise RuntimeError(f"{node.name} is running")
        # Appended: a rejoin's log follows the node's first life.
        with node.log.open("ab") as out:
            # A session of its own: kill_node kills its process group, Patroni and all. The
            # postmaster makes a session of its own too (Patroni calls setsid for it).
            node.patroni = await asyncio.create_subprocess_exec(
                *_as_postgres([self.patroni_bin, str(node.config)]),
                stdout=out,
                stderr=out,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                # Its own directory: the caller's (a CI clone, mode 0700, root's) is one the
                # postgres user cannot enter, and the standby's pg_basebackup failed there.
                cwd=node.base,
            )

    async def wait_ready(self, timeout: float = 90.0) -> Node:
        """Waits for one primary that Patroni names leader and every other node streaming from
        it (as the synchronous standby, in synchronous mode); returns the primary."""

        async def ready() -> Node | None:
            for node in self.nodes:
                if node.patroni is not None and node.patroni.returncode is not None:
                    raise RuntimeError(f"{node.name}'s Patroni exited: {self._tail(node.log)}")
            leader = await self.leader()
            if leader is None or await self.dcs_leader() != leader.name:
                return None
            try:
                conn = await asyncpg.connect(leader.url(), timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return None
            try:
                rows = await conn.fetch("SELECT application_name, state, sync_state FROM pg_stat_replication")
            finally:
                await conn.close()
            # By member name (Patroni's application_name): while a standby is being built,
            # pg_basebackup's own WAL stream is in pg_stat_replication as 'streaming' too.
            others = {n.name for n in self.nodes if n is not leader}
            streaming = [r for r in rows if r["state"] == "streaming" and r["application_name"] in others]
            if len(streaming) < len(others):
                return None
            if self.synchronous and not any(r["sync_state"] in ("sync", "quorum") for r in streaming):
                return None
            return leader

        result: Node = await _until(ready, timeout, f"a leader and a streaming standby ({self.mode})")
        return result

    # -- state --------------------------------------------------------------------------------

    async def leader(self) -> Node | None:
        """The one node whose PostgreSQL takes writes, or None (none, or two for a moment)."""
        roles = await asyncio.gather(*(n.role() for n in self.nodes))
        primaries = [n for n, r in zip(self.nodes, roles, strict=True) if r == "primary"]
        return primaries[0] if len(primaries) == 1 else None

    async def cluster(self) -> dict[str, Any]:
        """Patroni's view (GET /cluster) from the first node that answers; {} if none does."""
        for node in self.nodes:
            status, text = await _http("GET", f"{node.rest}/cluster", timeout=2)
            if status == 200:
                answer: dict[str, Any] = json.loads(text)
                return answer
        return {}

    async def dcs_leader(self) -> str | None:
        """The name holding the leader key (still the old primary until its key expires)."""
        for member in (await self.cluster()).get("members", []):
            if member.get("role") == "leader":
                return str(member["name"])
        return None

    def other(self, node: Node) -> Node:
        return next(n for n in self.nodes if n is not node)

    # -- faults -------------------------------------------------------------------------------

    async def kill_postmaster(self, node: Node) -> None:
        """kill -9 of ``node``'s postmaster; its backends end by themselves, Patroni stays."""
        pid = node.postmaster_pid()
        if pid is None:
            raise RuntimeError(f"{node.name}: no PostgreSQL running")
        os.kill(pid, signal.SIGKILL)

    async def kill_node(self, node: Node) -> None:
        """kill -9 of everything on ``node``: Patroni first (so that it does not react), then
        every PostgreSQL process (the postmaster's process group: its backends too)."""
        pid = node.postmaster_pid()
        if node.patroni is not None and node.patroni.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.patroni.pid, signal.SIGKILL)
            await node.patroni.wait()
        if pid is not None:
            # Patroni starts the postmaster from a helper that called setsid: the postmaster's
            # process group is the helper's, and its backends are in it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)

    async def stop_immediately(self, node: Node) -> None:
        """``pg_ctl stop -m immediate`` on ``node``: no shutdown checkpoint, as a crash; its
        Patroni sees PostgreSQL gone and starts it again (crash recovery)."""
        process = await asyncio.create_subprocess_exec(
            *_as_postgres([str(find_bindir() / "pg_ctl"), "-D", str(node.datadir), "-m", "immediate", "stop"]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=node.base,
        )
        await process.wait()

    async def restart(self, node: Node, timeout: float = 60.0) -> None:
        """A restart of ``node``'s PostgreSQL through its Patroni's REST API (a fast shutdown);
        asked again while Patroni answers 503 (busy: a promotion, another restart)."""

        async def restarted() -> bool:
            status, text = await _http("POST", f"{node.rest}/restart", {}, timeout=timeout)
            if status not in (200, 503):
                raise RuntimeError(f"{node.name}: restart refused ({status}): {text}")
            return status == 200

        await _until(restarted, timeout, f"{node.name}'s Patroni to restart PostgreSQL")

    async def until_down(self, node: Node, pid: int | None, timeout: float = 30.0) -> None:
        """Waits until the postmaster ``pid`` of ``node`` is gone (a new one, or none)."""

        async def gone() -> bool:
            return node.postmaster_pid() != pid

        await _until(gone, timeout, f"{node.name}'s postmaster {pid} to end")

    def keep_logs(self, into: Path) -> None:
        """Copies the logs (etcd, each Patroni) into ``into`` before ``close`` removes them."""
        into.mkdir(parents=True, exist_ok=True)
        for path in [self.base / "etcd.log", *(n.log for n in self.nodes)]:
            with contextlib.suppress(OSError):
                shutil.copy(path, into / f"{path.parent.name}-{path.name}")

    async def switchover(self, candidate: Node | None = None, timeout: float = 60.0) -> Node:
        """A planned switchover to ``candidate`` (the other node by default) through Patroni's
        REST API; returns the new primary once it takes writes."""
        leader = await self.leader()
        if leader is None:
            raise RuntimeError("no primary to switch over from")
        target = candidate or self.other(leader)

        async def switched() -> bool:
            # 412 while the candidate is not yet a healthy (synchronous) standby: asked again.
            status, text = await _http(
                "POST", f"{leader.rest}/switchover", {"leader": leader.name, "candidate": target.name}, timeout=30
            )
            if status not in (200, 412, 503, 0):
                raise RuntimeError(f"switchover refused ({status}): {text}")
            return status == 200

        await _until(switched, timeout, f"a switchover from {leader.name} to {target.name}")

        async def promoted() -> bool:
            return await self.leader() is target

        await _until(promoted, timeout, f"{target.name} to take writes")
        return target

    # -- end ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Kills every process this cluster started and removes its directory."""
        for node in self.nodes:
            with contextlib.suppress(OSError):
                await self.kill_node(node)
        if self.etcd is not None and self.etcd.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.etcd.pid, signal.SIGKILL)
            await self.etcd.wait()
        # The backends of a killed postmaster leave by themselves, within moments; the files
        # can go meanwhile (they hold no directory open that rmtree needs).
        await asyncio.to_thread(shutil.rmtree, self.base, True)

    async def __aenter__(self) -> PatroniCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def logs(self, chars: int = 4000) -> str:
        """The tail of every log (etcd, each node): printed when a test fails."""
        parts = [f"--- etcd\n{self._tail(self.base / 'etcd.log', chars)}"]
        parts += [f"--- {n.name}\n{self._tail(n.log, chars)}" for n in self.nodes]
        return "\n".join(parts)

    @staticmethod
    def _tail(path: Path, chars: int = 2000) -> str:
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


async def unavailable_for(cluster: PatroniCluster, timeout: float = 90.0) -> float:
    """Seconds from now until a node takes writes again (asked every 0.1 s)."""
    start = time.monotonic()

    async def writable() -> bool:
        return await cluster.leader() is not None

    await _until(writable, timeout, "a primary again")
    return time.monotonic() - start


async def _main(ns: argparse.Namespace) -> int:
    async with PatroniCluster(synchronous=not ns.asynchronous, strict=ns.strict) as cluster:
        leader = await cluster.wait_ready()
        print(f"{cluster.mode} replication, primary {leader.name}; DATABASE_URL={cluster.dsn()}", flush=True)
        if ns.fault == "kill-node":
            await cluster.kill_node(leader)
            await _until(lambda: _not_leader(cluster, leader), 60, "the old primary to be gone")
            print(f"no primary for {await unavailable_for(cluster):.1f} s after kill -9 of {leader.name}")
            await cluster.start_node(leader)
            await cluster.wait_ready()
            print(f"{leader.name} rejoined as a standby")
        elif ns.fault == "kill-postmaster":
            await cluster.kill_postmaster(leader)
            await _until(lambda: _not_leader(cluster, leader), 60, "the old postmaster to be gone")
            print(f"no primary for {await unavailable_for(cluster):.1f} s after kill -9 of the postmaster")
        elif ns.fault == "switchover":
            start = time.monotonic()
            new = await cluster.switchover()
            print(f"switched over to {new.name} in {time.monotonic() - start:.1f} s")
        if ns.hold:
            print("running; Ctrl-C stops and removes it", flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
    return 0


async def _not_leader(cluster: PatroniCluster, node: Node) -> bool:
    return await cluster.leader() is not node


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.chaos.patroni",
        description="A Patroni cluster (etcd, two PostgreSQL nodes) on loopback, optionally one fault.",
    )
    p.add_argument("--async", dest="asynchronous", action="store_true", help="asynchronous replication")
    p.add_argument("--strict", action="store_true", help="synchronous_mode_strict (no writes without a standby)")
    p.add_argument("--fault", choices=["kill-node", "kill-postmaster", "switchover"], default=None)
    p.add_argument("--hold", action="store_true", help="keep it running until Ctrl-C")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s patroni: %(message)s", stream=sys.stderr)
    return asyncio.run(_main(ns))


if __name__ == "__main__":
    raise SystemExit(main())
