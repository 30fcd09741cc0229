"""A TCP fault proxy: what the network can do to a connection, on demand.

The harness puts one between the apis and PostgreSQL and one between each executor and its
api, and switches its mode while the load runs:

- ``pass``: bytes flow both ways untouched;
- ``blackhole``: the half-open case. Connections are still accepted, but nothing is forwarded
  in either direction and nothing is ever closed. A connection that saw the blackhole stays dead
  for good, also after the mode goes back to ``pass`` (as after a host vanished: nobody will ever
  answer on it); only the client closing it ends it;
- ``latency``: every chunk is delayed by ``latency_s`` +- ``jitter_s`` (uniform), in order, per
  direction, without slowing the reading side (delays overlap, as on a long link);
- ``refuse``: the listening socket is closed, so new connections are refused (RST to the SYN);
  open ones carry on. Going back to another mode listens again on the same port.

``reset()`` ends every open connection with a TCP RST on both sides (SO_LINGER 0), in
whatever mode.

No maintained proxy installs here as a library we can drive from the harness's event loop
(toxiproxy is a Go server with an HTTP API, not packaged by Debian), and these four faults take
little code.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import struct
from dataclasses import dataclass, field

log = logging.getLogger("chaos.proxy")

_CHUNK = 64 * 1024


class Mode(enum.StrEnum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    LATENCY = "latency"
    REFUSE = "refuse"


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and the upstream's."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False
    """Saw a blackhole: never forwards again."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Closes with a RST instead of a FIN: linger on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """``127.0.0.1:port`` forwarding to ``upstream_host:upstream_port``, with faults on demand."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        latency_s: float = 0.2,
        jitter_s: float = 0.1,
        seed: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._host = listen_host
        self.port = listen_port
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self._rng = random.Random(seed)
        self.mode = Mode.PASS
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.accepted = 0
        self.resets = 0
        self.delays: list[float] = []
        """Every latency applied (seconds), for the tests and reports."""

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def set_mode(self, mode: Mode | str) -> None:
        mode = Mode(mode)
        previous, self.mode = self.mode, mode
        if mode is Mode.BLACKHOLE:
            for link in self._links:
                link.dead = True
        if mode is Mode.REFUSE and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif previous is Mode.REFUSE and self._server is None:
            await self._listen()
        log.info("proxy %s -> %s:%d: %s", self.address, *self.upstream, mode.value)

    def reset(self) -> int:
        """RSTs every open connection (both sides); returns how many."""
        links = list(self._links)
        for link in links:
            self._drop(link, rst=True)
        self.resets += len(links)
        return len(links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for link in list(self._links):
            self._drop(link, rst=False)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _drop(self, link: _Link, rst: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            if rst:
                _rst(writer)
            else:
                writer.transport.abort()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client=writer, dead=self.mode is Mode.BLACKHOLE)
        self._links.add(link)
        if link.dead:
            # Accepted, and then nothing: read and drop until the client gives up.
            await self._swallow(link, reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._drop(link, rst=True)
            return
        if link not in self._links:  # reset while connecting
            up_writer.transport.abort()
            return
        link.upstream = up_writer
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer)),
            asyncio.create_task(self._pump(link, up_reader, writer)),
        ]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*link.tasks)
        self._drop(link, rst=False)

    async def _swallow(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(_CHUNK):
                pass
        except OSError:
            pass
        finally:
            self._drop(link, rst=False)

    def _delay(self) -> float:
        d = max(0.0, self.latency_s + self._rng.uniform(-self.jitter_s, self.jitter_s))
        self.delays.append(d)
        return d

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Forwards one direction; a delayed chunk is written by ``_deliver`` in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliverer = asyncio.create_task(self._deliver(link, queue, dst))
        last_due = 0.0
        try:
            while True:
                try:
                    data = await src.read(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    if link.dead:
                        # Half-open: the other side never learns.
                        await asyncio.Future()
                    await queue.join()
                    # RuntimeError: uvloop's answer when the other side was closed meanwhile.
                    with contextlib.suppress(OSError, RuntimeError):
                        if dst.can_write_eof():
                            dst.write_eof()
                    return
                if link.dead or self.mode is Mode.BLACKHOLE:
                    link.dead = True
                    continue
                due = 0.0
                if self.mode is Mode.LATENCY:
                    # In order: never before the chunk ahead of it.
                    due = max(last_due, loop.time() + self._delay())
                    last_due = due
                queue.put_nowait((due, data))
        finally:
            deliverer.cancel()

    async def _deliver(self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            try:
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the latency being injected
                if not link.dead:
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                queue.task_done()


async def _main(argv: list[str] | None = None) -> None:
    """``python -m tools.chaos.proxy LISTEN_PORT UPSTREAM_HOST:PORT [MODE]``, for trying by hand."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tools.chaos.proxy")
    p.add_argument("listen_port", type=int)
    p.add_argument("upstream")
    p.add_argument("mode", nargs="?", default="pass", choices=[m.value for m in Mode])
    ns = p.parse_args(argv)
    host, _, port = ns.upstream.rpartition(":")
    proxy = await FaultProxy(host or "127.0.0.1", int(port), listen_port=ns.listen_port).start()
    await proxy.set_mode(ns.mode)
    print(f"proxying {proxy.address} -> {ns.upstream} ({ns.mode}); Ctrl-C ends", flush=True)
    try:
        await asyncio.Future()
    finally:
        await proxy.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
