"""uvicorn's httptools protocol, sending a response's head and body in one system call.

uvicorn writes the status line and headers to the socket as soon as the app sends
`http.response.start`, and the body in a second write when `http.response.body` follows: two
system calls and, with TCP_NODELAY, two segments per response. A client that sleeps between
them (most do) is woken twice, and some small device HTTP stacks do a single read and expect
the whole of a short response in it (what aiohttp fixed the same way, aio-libs/aiohttp#10991).

Here the writes a connection makes in one step of the event loop are held and go out together
(`writelines`: one `writev` on uvloop, no copy) at the start of the loop's next step. A head and
a body sent back to back leave as one segment; a long download still streams chunk by chunk.
`otaplane serve` uses this class (`uvicorn.run(..., http=CoalescingHttpToolsProtocol)`). It also
answers a request that cannot be parsed with the gateway's JSON error, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from otaplane import errors, ids
from otaplane.openapi import envelope


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    camel = False  # --response-case camel: the 400 below in lower-camel keys, as every answer

    @classmethod
    def for_case(cls, response_case: str) -> type[CoalescingHttpToolsProtocol]:
        """The class answering in `response_case` (uvicorn takes a protocol class, not an object)."""
        if response_case != "camel":
            return cls
        return type(cls.__name__, (cls,), {"camel": True})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (a URL or header past its limits, broken framing):
        the gateway's error body, not uvicorn's plain text, so clients read a Code and a RequestId."""
        request_id = ids.request_id()
        error = errors.invalid("Request", f"it is not an HTTP/1.1 request this server can read ({msg})")
        reply = envelope.failure(None, request_id, error, "JSON", self.camel, "")
        self.transport.write(b"".join([
            b"HTTP/1.1 400 Bad Request\r\n",
            b"content-type: " + reply.content_type + b"\r\n",
            b"content-length: " + str(len(reply.body)).encode("ascii") + b"\r\n",
            b"x-acs-request-id: " + request_id.encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            reply.body,
        ]))
        self.transport.close()


class _CoalescingTransport:
    """A transport whose writes of one loop step are sent at once; all else is the transport's."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            if len(pending) == 1:
                self._transport.write(pending[0])
            else:
                self._transport.writelines(pending)

    def get_write_buffer_size(self) -> int:
        held = sum(len(chunk) for chunk in self._pending) if self._pending else 0
        return self._transport.get_write_buffer_size() + held

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()  # what was written before close() still goes out, as with any transport
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)
