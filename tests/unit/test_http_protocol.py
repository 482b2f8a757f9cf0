"""otaplane.http_protocol: uvicorn's httptools protocol with a response's head and body sent in
one write. Driven through uvicorn's own protocol code, with a transport that records its calls."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from uvicorn.config import Config
from uvicorn.server import ServerState

from otaplane.http_protocol import CoalescingHttpToolsProtocol, _CoalescingTransport


class RecordingTransport(asyncio.Transport):
    """What reached the socket, call by call (write: one chunk, writelines: the list)."""

    def __init__(self):
        super().__init__()
        self.sends: list[list[bytes]] = []
        self.closed = False

    def write(self, data):
        self.sends.append([bytes(data)])

    def writelines(self, chunks):
        self.sends.append([bytes(c) for c in chunks])

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def get_write_buffer_size(self):
        return 0

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)


async def hello(_request):
    return PlainTextResponse("hello")


async def stream(_request):
    async def chunks():
        for part in (b"one", b"two", b"three"):
            await asyncio.sleep(0.01)
            yield part

    return StreamingResponse(chunks())


APP = Starlette(routes=[Route("/", hello, methods=["GET", "HEAD"]), Route("/stream", stream)])


async def _serve(request: bytes, settle_s: float = 0.05) -> RecordingTransport:
    protocol = CoalescingHttpToolsProtocol(Config(APP, log_level="warning"), ServerState(), {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.sleep(settle_s)
    return transport


@pytest.mark.anyio
async def test_a_short_response_leaves_in_one_write():
    transport = await _serve(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.sends) == 1
    response = b"".join(transport.sends[0])
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\nhello")


@pytest.mark.anyio
async def test_a_head_response_without_body_write_still_leaves():
    transport = await _serve(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.sends) == 1
    assert b"".join(transport.sends[0]).endswith(b"\r\n\r\n")


@pytest.mark.anyio
async def test_a_streamed_body_still_leaves_chunk_by_chunk():
    transport = await _serve(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", settle_s=0.2)
    everything = b"".join(b"".join(send) for send in transport.sends)
    assert everything.endswith(b"0\r\n\r\n") and b"three" in everything
    assert len(transport.sends) >= 3  # each chunk went out when it was ready, not all at the end


@pytest.mark.anyio
async def test_close_sends_what_was_written_first():
    inner = RecordingTransport()
    transport = _CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert inner.sends == [[b"last words"]] and inner.closed
    await asyncio.sleep(0)  # the flush scheduled by write() finds nothing left
    assert inner.sends == [[b"last words"]]


@pytest.mark.anyio
async def test_abort_drops_what_was_held():
    inner = RecordingTransport()
    inner.abort = lambda: setattr(inner, "closed", True)
    transport = _CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"never")
    transport.abort()
    await asyncio.sleep(0)
    assert inner.sends == [] and inner.closed
    assert transport.get_write_buffer_size() == 0
