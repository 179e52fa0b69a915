"""A 50 MB body is refused with 413 problem+json, fast, without the server's memory growing (issue 8).

Against a live `carnet serve` process (uvicorn, real sockets), so the server's own buffering is part of
what is measured: its resident set size is read from /proc before and after each body. Each body is sent
twice: by a plain socket that watches for the answer while it writes (the server must answer long before
the body ends; with Content-Length on the headers alone, before any body byte), and by httpx, which sends
it all (a naive client: it must still get the 413, and the connection stays usable).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.auth import TEST_SECRET, bearer
from tests.faults.harness import LiveServer, rss_kib

BIG = 50 * 1024 * 1024
CHUNK = 64 * 1024
LIMIT = 5 * 1024 * 1024            # MAX_BODY_BYTES default: the live server runs with the defaults
MAX_RSS_GROWTH_KIB = 8 * 1024      # "a few MB": allocator noise, never a buffered body
ADMIN = bearer()


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("body-limits"), database_url, TEST_SECRET, LOG_LEVEL="WARNING")
    live.start()
    yield live
    live.stop()


def _pattern() -> bytes:
    # A JSON-looking prefix, then filler: the server must not care what is inside.
    return (b'{"email": "big@example.com", "notes": "' + b"x" * CHUNK)[:CHUNK]


async def _raw_post(port: int, path: str, *, chunked: bool) -> tuple[bytes, int, float]:
    """Send a 50 MB body while watching for the answer; (response head+body, bytes of body sent, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = b"Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {ADMIN['Authorization']}\r\n").encode() + framing + b"\r\n\r\n"
    started = time.monotonic()
    writer.write(head)
    await writer.drain()
    answer = asyncio.ensure_future(reader.read(65536))
    sent, chunk = 0, _pattern()
    try:
        if not chunked:  # the declared length is enough to refuse: no body byte is needed for the answer
            await asyncio.wait({answer}, timeout=5)
        while sent < BIG and not answer.done():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
            drained = asyncio.ensure_future(writer.drain())
            await asyncio.wait({drained, answer}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if not drained.done():  # the server stopped reading: fine only if it answered
                drained.cancel()
                break
        data = await asyncio.wait_for(answer, timeout=10)
        elapsed = time.monotonic() - started
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            more = await asyncio.wait_for(reader.read(65536), timeout=10)
            if not more:
                break
            data += more
        return data, sent, elapsed
    finally:
        writer.transport.abort()


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(data)


def _assert_413(head_and_body: bytes) -> None:
    head, _, body = head_and_body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 413"), lines[0]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["status"] == 413 and problem["type"].endswith("/payload-too-large"), problem


async def _stream(total: int) -> AsyncIterator[bytes]:
    """A body httpx sends as it is produced (chunked unless a Content-Length header is given)."""
    chunk, sent = _pattern(), 0
    while sent < total:
        yield chunk
        sent += len(chunk)


async def _warm_up(http: httpx.AsyncClient) -> None:
    """Every code path of the test once, with small bodies: imports, pools and caches are loaded before."""
    for _ in range(3):
        small = await http.post("/v1/contacts/batch", content=b"x" * (LIMIT + CHUNK))
        assert small.status_code == 413
        chunked = await http.post("/v1/contacts/batch", content=_stream(LIMIT + 2 * CHUNK))
        assert chunked.status_code == 413
        assert (await http.get("/v1/contacts", params={"limit": 1})).status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_50_mb_body_is_refused_early_by_a_live_server(server: LiveServer, chunked: bool) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, headers=ADMIN, timeout=30) as http:
        await _warm_up(http)
        before = rss_kib(server.pid)
        peak = before  # RSS after each refused body: a body kept alive until the next GC shows up at once

        for path in ("/v1/contacts", "/v1/contacts/batch") * 2:
            response, sent, elapsed = await _raw_post(server.port, path, chunked=chunked)
            _assert_413(response)
            peak = max(peak, rss_kib(server.pid))
            assert elapsed < 2.0, f"{path}: answered after {elapsed:.2f} s"
            if chunked:  # read up to the limit, then refused (kernel socket buffers hold a few MB more)
                assert sent <= BIG // 2, f"{path}: {sent} bytes sent before the answer"
            else:        # refused on the headers alone
                assert sent == 0, f"{path}: {sent} bytes sent before the answer"

            # A client that sends everything anyway gets the same answer, quickly, on a usable connection.
            started = time.monotonic()
            headers = {"content-type": "application/json"} | ({} if chunked else {"content-length": str(BIG)})
            refused = await http.post(path, content=_stream(BIG), headers=headers)
            assert refused.status_code == 413, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert time.monotonic() - started < 10
            peak = max(peak, rss_kib(server.pid))
            assert (await http.get("/v1/contacts", params={"limit": 1})).status_code == 200

    grown = peak - before
    assert grown <= MAX_RSS_GROWTH_KIB, f"the server's RSS grew by up to {grown} KiB over eight refused 50 MB bodies"
    assert server.alive()

