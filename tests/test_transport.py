"""The transport reads answers only up to `max_answer_bytes`, compressed or not.

A plain aiohttp server on 127.0.0.1 (no FakeEngage) serves what Engage never would: a huge
body, a huge Content-Length, gzip and deflate bombs (half a megabyte inflating to 512 MiB).
Memory is measured with tracemalloc, never time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import make_config

import engage_async as ea
from engage_async._http import Call
from engage_async._transport import Transport
from engage_async.testing import FakeEngage

LIMIT: Final = 1024 * 1024
MiB: Final = 1024 * 1024
BOMB_MIB: Final = 512
KEY: Final = "sekrit-key-123"


@functools.cache
def bomb(encoding: str) -> bytes:
    """A valid gzip or zlib ("deflate") stream of `BOMB_MIB` MiB of zeros, about 0.5 MB.

    Built from one compressed MiB repeated: after a full flush the compressor starts afresh,
    so each further MiB compresses to the same bytes; the trailer's checksum and length are
    computed for the whole.
    """
    block = bytes(MiB)
    gzipped = encoding == "gzip"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if gzipped else 15)
    head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()[: -8 if gzipped else -4]
    check = 0 if gzipped else 1
    for _ in range(BOMB_MIB):
        check = zlib.crc32(block, check) if gzipped else zlib.adler32(block, check)
    if gzipped:
        trailer = struct.pack("<II", check, (BOMB_MIB * MiB) & 0xFFFFFFFF)
    else:
        trailer = struct.pack(">I", check)
    return head + again * (BOMB_MIB - 1) + end + trailer


async def _stream(request: web.Request, size: int, length: int | None = None) -> web.StreamResponse:
    """Send `size` zero bytes in 64 KiB writes; a client that hangs up ends it quietly."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    chunk = bytes(64 * 1024)
    with contextlib.suppress(ConnectionError, OSError):
        for _ in range(size // len(chunk)):
            await response.write(chunk)
        await response.write(bytes(size % len(chunk)))
        await response.write_eof()
    return response


def _app() -> web.Application:
    bombs = {encoding: bomb(encoding) for encoding in ("gzip", "deflate")}

    async def plain(request: web.Request) -> web.StreamResponse:
        return await _stream(request, int(request.match_info["size"]))

    async def announced(request: web.Request) -> web.StreamResponse:
        return await _stream(request, 1024, length=1 << 40)

    async def exact(request: web.Request) -> web.Response:
        size = int(request.match_info["size"])
        return web.Response(body=b'"' + b"x" * (size - 2) + b'"', content_type="application/json")

    async def compressed(request: web.Request) -> web.Response:
        encoding = request.match_info["encoding"]
        return web.Response(
            body=bombs[encoding],
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        )

    async def small_gzip(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(json.dumps({"ok": True}).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(dict(request.headers)), status=502)

    app = web.Application()
    app.router.add_get("/plain/{size}", plain)
    app.router.add_get("/announced", announced)
    app.router.add_get("/exact/{size}", exact)
    app.router.add_get("/bomb/{encoding}", compressed)
    app.router.add_get("/small-gzip", small_gzip)
    app.router.add_get("/echo", echo)
    return app


@pytest.fixture(name="server")
async def server_fixture() -> AsyncIterator[TestServer]:
    """A plain aiohttp server on 127.0.0.1 with a free port."""
    server = TestServer(_app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture(name="transport")
async def transport_fixture(server: TestServer, tmp_path: Path) -> AsyncIterator[Transport]:
    """An open Transport to `server`, reading at most `LIMIT` bytes an answer."""
    base = str(server.make_url("/")).rstrip("/")
    transport = Transport(make_config(base, KEY, tmp_path, max_answer_bytes=LIMIT))
    transport.open()
    try:
        yield transport
    finally:
        await transport.close()


async def peak_memory(action: Callable[[], Awaitable[Any]]) -> tuple[int, BaseException | None]:
    """The peak of traced Python memory while `action` runs, and what it raised."""
    tracemalloc.start()
    try:
        try:
            await action()
        except Exception as exc:
            raised: BaseException | None = exc
        else:
            raised = None
        return tracemalloc.get_traced_memory()[1], raised
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "path",
    ["/plain/67108864", "/bomb/gzip", "/bomb/deflate"],
    ids=["64MiB-plain-chunked", "gzip-bomb", "deflate-bomb"],
)
async def test_answer_past_the_limit_is_given_up_with_bounded_memory(
    transport: Transport, path: str
) -> None:
    """A body larger than the limit, plain or inflating from a small gzip or deflate stream,
    raises `UnexpectedResponse` (outcome unknown, with the status) once the limit is passed:
    memory stays within a few times the limit, far below what the body holds.
    """
    peak, raised = await peak_memory(lambda: transport.send(Call("GET", path), 30.0))

    assert isinstance(raised, ea.UnexpectedResponse)
    assert (200, True) == (raised.status, raised.request_sent)
    assert "larger than 1,048,576 bytes" in str(raised)
    assert peak < 8 * LIMIT, f"peak {peak:,} bytes"


async def test_announced_length_past_the_limit_is_refused_unread(transport: Transport) -> None:
    """A Content-Length over the limit is refused before any of the body is read."""
    peak, raised = await peak_memory(lambda: transport.send(Call("GET", "/announced"), 30.0))

    assert isinstance(raised, ea.UnexpectedResponse)
    assert "1,099,511,627,776 bytes announced" in str(raised)
    assert peak < LIMIT


async def test_answer_of_exactly_the_limit_is_read(transport: Transport) -> None:
    """The limit is inclusive: an answer of exactly `max_answer_bytes` is read whole, one byte
    more is not.
    """
    status, _, body = await transport.send(Call("GET", f"/exact/{LIMIT}"), 30.0)

    assert (200, LIMIT) == (status, len(body))
    with pytest.raises(ea.UnexpectedResponse):
        await transport.send(Call("GET", f"/exact/{LIMIT + 1}"), 30.0)


async def test_compressed_answer_is_read_decompressed(transport: Transport) -> None:
    """An ordinary gzip answer is decompressed as before."""
    status, _, body = await transport.send(Call("GET", "/small-gzip"), 30.0)

    assert (200, {"ok": True}) == (status, json.loads(body))


async def test_transport_still_works_after_giving_up_an_answer(transport: Transport) -> None:
    """The connection of an answer given up is dropped, not reused half-read: the next call
    on the same transport reads its answer normally.
    """
    with pytest.raises(ea.UnexpectedResponse):
        await transport.send(Call("GET", "/bomb/gzip"), 30.0)

    status, _, body = await transport.send(Call("GET", "/small-gzip"), 30.0)

    assert (200, b'{"ok": true}') == (status, body)


async def test_lent_session_without_auto_decompress_is_still_bounded(
    server: TestServer, tmp_path: Path
) -> None:
    """A host's aiohttp session lent with auto_decompress off still gets decompressed, bounded
    answers: the transport asks for decompression per request.
    """
    base = str(server.make_url("/")).rstrip("/")
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        transport = Transport(make_config(base, KEY, tmp_path, max_answer_bytes=LIMIT), http)
        transport.open()
        try:
            _, _, body = await transport.send(Call("GET", "/small-gzip"), 30.0)
            with pytest.raises(ea.UnexpectedResponse):
                await transport.send(Call("GET", "/bomb/gzip"), 30.0)
        finally:
            await transport.close()

    assert b'{"ok": true}' == body


async def test_an_answer_echoing_the_api_key_does_not_carry_it(transport: Transport) -> None:
    """A proxy page that echoes the request's headers is returned with the key blotted out."""
    _, _, body = await transport.send(Call("GET", "/echo"), 30.0)

    assert (False, "***") == (KEY.encode() in body, json.loads(body)["apikey"])


async def test_oversize_answer_to_an_update_queues_it(fake: FakeEngage, tmp_path: Path) -> None:
    """An answer over the limit leaves a write's outcome unknown: the update is queued."""
    config = make_config(fake.url, fake.api_key, tmp_path, max_answer_bytes=64 * 1024)
    guid = fake.add_contact({"email": "anna@example.com"})
    fake.inject("status", method="PATCH", status=200, body=b"[" + b"0," * 50_000 + b"0]")
    async with ea.EngageSession(config) as engage:
        delivery = await engage.update_contact(guid, {"firstName": "Anna"})

    assert (True, guid) == (delivery.queued, delivery.contact_id)


async def test_oversize_answer_to_a_read_raises(fake: FakeEngage, tmp_path: Path) -> None:
    """A read has nothing to queue: an answer over the limit raises `UnexpectedResponse`."""
    config = make_config(fake.url, fake.api_key, tmp_path, max_answer_bytes=64 * 1024)
    guid = fake.add_contact({"email": "anna@example.com"})
    fake.inject("status", method="GET", status=200, body=b"[" + b"0," * 50_000 + b"0]")
    async with ea.EngageSession(config) as engage:
        with pytest.raises(ea.UnexpectedResponse):
            await asyncio.wait_for(engage.get_contact(guid), 10)
