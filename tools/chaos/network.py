"""The run's network: a fault proxy in each path the faults act on.

- ``db``: one proxy per PostgreSQL server (each Patroni node), between the apis and it; the
  apis' ``DATABASE_URL`` names the proxies. The harness's own connections (the checks, the
  fault bookkeeping) go around them, straight to the servers.
- ``executors``: one proxy per executor slot, between the executor and its api.

A fault switches a path's mode for a while and back. ``latency`` is the only fault that lasts
long (a minute) and runs beside the others: it sets the *base* mode, the one a path returns to
when a shorter fault on it ends, so a blackhole during a latency window comes back slow, not
clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tools.chaos.proxy import FaultProxy, Mode

log = logging.getLogger("chaos")


class Network:
    def __init__(self, db_upstreams: list[tuple[str, int]], executor_upstreams: dict[int, str], seed: int) -> None:
        self.db = [FaultProxy(host, port, seed=seed + i) for i, (host, port) in enumerate(db_upstreams)]
        self.executors: dict[int, FaultProxy] = {}
        for slot, target in executor_upstreams.items():
            host, _, port = target.rpartition(":")
            self.executors[slot] = FaultProxy(host, int(port), seed=seed + 100 + slot)
        self._base = Mode.PASS
        self._overridden: set[FaultProxy] = set()
        self._latency: asyncio.Task[None] | None = None

    @property
    def everything(self) -> list[FaultProxy]:
        return [*self.db, *self.executors.values()]

    async def start(self) -> None:
        for proxy in self.everything:
            await proxy.start()

    @property
    def db_addresses(self) -> list[str]:
        return [p.address for p in self.db]

    @property
    def executor_addresses(self) -> dict[int, str]:
        return {slot: p.address for slot, p in self.executors.items()}

    def path(self, name: str) -> list[FaultProxy]:
        """``db``, ``executors`` or ``all``."""
        if name == "db":
            return list(self.db)
        if name == "executors":
            return list(self.executors.values())
        return self.everything

    async def hold(self, proxies: list[FaultProxy], mode: Mode, seconds: float, reset: bool = False) -> int:
        """``mode`` on ``proxies`` for ``seconds``, then back to the base mode. With ``reset``,
        every open connection is reset once the mode is on (so that none gets around it);
        returns how many were."""
        self._overridden.update(proxies)
        try:
            for p in proxies:
                await p.set_mode(mode)
            n = self.reset(proxies) if reset else 0
            await asyncio.sleep(seconds)  # the fault's duration, not a synchronisation
            return n
        finally:
            self._overridden.difference_update(proxies)
            for p in proxies:
                await p.set_mode(self._base)

    def reset(self, proxies: list[FaultProxy]) -> int:
        return sum(p.reset() for p in proxies)

    async def latency_window(self, seconds: float) -> None:
        """Latency (each proxy's 200 ms +- 100 ms) on every path for ``seconds``, in the
        background; returns at once. A window still open is extended instead."""
        if self._latency is not None and not self._latency.done():
            self._latency.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._latency
        await self._set_base(Mode.LATENCY)
        self._latency = asyncio.create_task(self._end_latency(seconds), name="latency-window")

    async def _end_latency(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the window's length
        await self._set_base(Mode.PASS)

    async def _set_base(self, mode: Mode) -> None:
        self._base = mode
        for p in self.everything:
            if p not in self._overridden:
                await p.set_mode(mode)
        log.info("network: every path now %s", mode.value)

    async def calm(self) -> None:
        """Ends every fault (the latency window too): the drain runs on a clean network."""
        if self._latency is not None:
            self._latency.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._latency
        self._overridden.clear()
        await self._set_base(Mode.PASS)

    async def close(self) -> None:
        if self._latency is not None:
            self._latency.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._latency
        for p in self.everything:
            with contextlib.suppress(Exception):
                await p.close()
