"""The fault proxy does what each mode says, over real loopback connections to an echo server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tools.chaos.proxy import FaultProxy, Mode

# How long a test listens for bytes that must not come. Bounds the test; it measures nothing.
QUIET_S = 0.3


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


@pytest.fixture
async def proxy(echo: int) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo, seed=7) as p:
        yield p


async def connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)


async def nothing_arrives(reader: asyncio.StreamReader) -> bool:
    """True when no byte and no EOF arrives within QUIET_S: the connection is silent, not closed."""
    try:
        await asyncio.wait_for(reader.read(1), QUIET_S)
    except TimeoutError:
        return True
    return False


async def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    payload = bytes(range(256)) * 1000
    assert await roundtrip(reader, writer, payload) == payload
    writer.close()


async def test_blackhole_accepts_forwards_nothing_and_never_closes(proxy: FaultProxy) -> None:
    old_reader, old_writer = await connect(proxy)
    assert await roundtrip(old_reader, old_writer, b"before") == b"before"
    await proxy.set_mode(Mode.BLACKHOLE)

    # An open connection goes silent; a new one is accepted, and silent too.
    old_writer.write(b"lost")
    await old_writer.drain()
    assert await nothing_arrives(old_reader)
    new_reader, new_writer = await connect(proxy)
    new_writer.write(b"hello?")
    await new_writer.drain()
    assert await nothing_arrives(new_reader)
    assert not old_reader.at_eof() and not new_reader.at_eof()

    # Back to pass: connections that saw the blackhole stay dead (the half-open case); new ones work.
    await proxy.set_mode(Mode.PASS)
    old_writer.write(b"again")
    await old_writer.drain()
    assert await nothing_arrives(old_reader)
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"after") == b"after"
    for w in (old_writer, new_writer, writer):
        w.close()


async def test_latency_delays_every_chunk_in_order(proxy: FaultProxy) -> None:
    await proxy.set_mode(Mode.LATENCY)
    reader, writer = await connect(proxy)
    chunks = [f"{i:04d}".encode() for i in range(20)]
    for c in chunks:
        writer.write(c)
        await writer.drain()
    received = await asyncio.wait_for(reader.readexactly(4 * len(chunks)), 30)
    assert received == b"".join(chunks)  # in order, nothing lost
    # Each direction delayed each chunk it carried, by 200 ms +- 100 ms.
    assert len(proxy.delays) >= 2
    assert all(0.1 <= d <= 0.3 for d in proxy.delays)
    writer.close()


async def test_reset_ends_every_open_connection_with_rst(proxy: FaultProxy) -> None:
    pairs = [await connect(proxy) for _ in range(3)]
    for r, w in pairs:
        assert await roundtrip(r, w, b"x") == b"x"
    assert proxy.reset() == 3
    for r, _w in pairs:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(1), 10)
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"new") == b"new"
    writer.close()


async def test_refuse_refuses_new_connections_keeps_open_ones(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    await proxy.set_mode(Mode.REFUSE)
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy)
    assert await roundtrip(reader, writer, b"still") == b"still"
    await proxy.set_mode(Mode.PASS)
    r2, w2 = await connect(proxy)  # the same port listens again
    assert await roundtrip(r2, w2, b"back") == b"back"
    writer.close()
    w2.close()
