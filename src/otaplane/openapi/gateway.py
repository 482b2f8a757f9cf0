"""The RPC endpoint on `/`: read the request, authenticate, parse, dispatch, wrap.

The gateway is a plain ASGI app, put in front of the Starlette app (`in_front_of`): `/` is
every signed request, and Starlette's routing, Request and Response objects cost as much as
the rest of the HTTP work. What it answers is exactly what a Starlette endpoint answered.

Reading the request happens on the event loop. Database work does not block it:
- the AccessKey and the instance come from caches (AccountService) most of the time;
- nonces go to a file beside SQLite (store.nonce_file), inline, or are group-committed in
  the database by one writer thread (store.nonces.NonceWriter);
- on PostgreSQL the rest runs in one worker-thread hop, so the loop (and the MQTT broker
  sharing it) never waits on a network round trip; quick reads there take at most
  QUICK_READ_CONNECTIONS threads and connections kept in autocommit mode (Database.autocommit_read);
- on SQLite the short reads of `quick_read` actions run on the loop itself (a local indexed
  SELECT costs less than the thread hop would); every other action takes the thread hop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import anyio.to_thread
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from otaplane import errors, ids
from otaplane.blobs.base import BlobStoreUnavailable
from otaplane.errors import ApiError
from otaplane.openapi import envelope
from otaplane.openapi.auth import Authenticator, Caller, SignedRequest
from otaplane.openapi.params import parse_params
from otaplane.openapi.ratelimit import RateLimiter
from otaplane.openapi.registry import API_VERSION, Action, build_table
from otaplane.services.container import Services
from otaplane.store.database import QUICK_READ_CONNECTIONS

log = logging.getLogger("otaplane.gateway")

MAX_BODY_BYTES = 4 * 1024 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"
# The methods routed to the gateway (server.py); it refuses all but GET and POST itself.
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")

# What Starlette's ServerErrorMiddleware answers when an app raises before responding.
_INTERNAL_SERVER_ERROR = (
    {"type": "http.response.start", "status": 500,
     "headers": [(b"content-length", b"21"), (b"content-type", b"text/plain; charset=utf-8")]},
    {"type": "http.response.body", "body": b"Internal Server Error"},
)


class Gateway:
    def __init__(self, services: Services):
        self.services = services
        self.actions: dict[str, Action] = build_table()
        settings = services.settings
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_limit_burst)
        self.camel = settings.response_case == "camel"
        self.inline_reads = services.db.is_sqlite
        # PostgreSQL: the threads of quick reads, one per connection of the read pool (store.database),
        # so none waits in its checkout. An executor, not anyio.to_thread: a hop through it costs a
        # third to half the CPU.
        self._quick_reads = ThreadPoolExecutor(QUICK_READ_CONNECTIONS, thread_name_prefix="otaplane-reads")
        self.auth = Authenticator(services.accounts, services.nonces, settings.signature_window_seconds,
                                  self._run_db)

    def close(self) -> None:
        """After the last request: the quick-read threads finish what they run, then end."""
        self._quick_reads.shutdown(wait=True)

    def in_front_of(self, app: ASGIApp) -> ASGIApp:
        """`app`, with the requests for `/` handed straight to the gateway."""

        async def front(scope: Scope, receive: Receive, send: Send) -> None:
            if (scope["type"] == "http" and scope["path"] == "/" and not scope.get("root_path")
                    and scope["method"] in METHODS):
                await self(scope, receive, send)
            else:
                await app(scope, receive, send)

        return front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request_id, reply = await self._answer(scope, receive)
        except Exception:
            # Like Starlette's ServerErrorMiddleware: a plain 500, and uvicorn logs the error.
            for message in _INTERNAL_SERVER_ERROR:
                await send(message)
            raise
        # The headers, and their order, of a Starlette Response(body, status, headers={...}).
        await send({
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (b"x-acs-request-id", request_id.encode("latin-1")),
                (b"content-length", str(len(reply.body)).encode("latin-1")),
                (b"content-type", reply.content_type),
            ],
        })
        await send({"type": "http.response.body", "body": reply.body})

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[str, envelope.Reply]:
        request_id = ids.request_id()
        method = scope["method"]
        # Bytes that are not UTF-8 become U+FFFD: the signature then fails to match, not the server.
        query_text = scope["query_string"].decode("utf-8", "replace")
        query = parse_query(query_text)
        params = dict(query)
        raw_headers = scope["headers"]
        # ASGI servers hand header names over in lower case (the ASGI spec requires it).
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}  # last wins
        first = headers  # a header sent more than once: lookups by name see its first value
        if len(headers) != len(raw_headers):
            first = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(raw_headers)}
        fmt, action_name = _format_and_action(params, first)
        try:
            if first is not headers:
                _refuse_repeated_signed_headers(raw_headers)
            if method not in ("GET", "POST"):
                raise errors.UnsupportedHTTPMethod()
            body = b""  # HTTP/1.1 framing: no Content-Length nor Transfer-Encoding, no body
            if "content-length" in first or "transfer-encoding" in first:
                body = await _read_body(receive, first.get("content-length"), "transfer-encoding" in first)
            form_text = ""
            if body and first.get("content-type", "").startswith(FORM_TYPE):
                form_text = body.decode("utf-8", "replace")
                params = {**params, **dict(parse_query(form_text))}
                # A form may carry every parameter, common ones too (signed all the same): a
                # browser or a plain HTTP client posting the signed request as a form.
                fmt, action_name = _format_and_action(params, first)
            if _may_hold_nul(query_text) or _may_hold_nul(form_text):
                _refuse_nul(params)
            action = self._resolve_action(action_name, params, method, first)
            signed = SignedRequest(method, scope["path"], query, params, headers, body)
            payload = await self._process(action, signed)
        except ApiError as error:
            if error.spec.http_status >= 500:
                log.error("request %s failed: %s", request_id, error.code)
            return request_id, envelope.failure(action_name, request_id, error, fmt, self.camel,
                                                first.get("host", ""))
        except BlobStoreUnavailable as problem:  # S3 down, hung or refusing us: temporary, no traceback
            log.error("request %s (%s) failed: %s", request_id, action_name, problem)
            return request_id, envelope.failure(action_name, request_id, errors.ServiceUnavailable(), fmt,
                                                self.camel, first.get("host", ""))
        except ClientDisconnect:  # gone mid-body: nothing to answer, and not the server's fault
            log.info("request %s (%s): the client closed the connection before its body ended", request_id,
                     action_name)
            return request_id, envelope.failure(action_name, request_id, errors.invalid("Body", "incomplete"), fmt,
                                                self.camel, first.get("host", ""))
        except Exception:
            log.exception("request %s (%s) failed unexpectedly", request_id, action_name)
            return request_id, envelope.failure(action_name, request_id, errors.InternalError(), fmt,
                                                self.camel, first.get("host", ""))
        return request_id, envelope.success(action.name, request_id, payload, fmt, self.camel)

    def _resolve_action(self, action_name: str | None, params: dict[str, str], method: str,
                        headers: dict[str, str]) -> Action:
        if not action_name or ("Action" not in params and not headers.get("authorization", "").startswith("ACS3-")):
            raise errors.missing("Action")  # V1 signs the parameters only: an action in a header is unsigned
        version = params.get("Version") or headers.get("x-acs-version")
        if not version:
            raise errors.missing("Version")
        if version != API_VERSION:
            raise errors.InvalidVersion()
        action = self.actions.get(action_name)
        if action is None or method not in action.methods:
            raise errors.InvalidAction()
        return action

    async def _run_db(self, function, *args):
        """A short read: inline on SQLite (on the loop's own connection, in its read turn),
        in a worker thread on PostgreSQL."""
        if self.inline_reads:
            with self.services.db.loop_reads():
                return function(*args)
        return await anyio.to_thread.run_sync(function, *args)

    async def _process(self, action: Action, signed: SignedRequest) -> dict:
        """Authenticate (nonce committed), throttle, parse and run the action."""
        caller = self.auth.authenticate_now(signed) or await self.auth.authenticate(signed)
        if not self.limiter.allow(caller.access_key_id):
            raise errors.ThrottlingUser()
        values = parse_params(action.all_params, signed.params)
        if self.inline_reads and action.quick_read:
            with self.services.db.loop_reads():
                return self._run_action(action, caller, values)
        if action.quick_read:
            return await asyncio.get_running_loop().run_in_executor(
                self._quick_reads, self.services.db.autocommit_read, self._run_action, action, caller, values)
        return await anyio.to_thread.run_sync(self._run_action, action, caller, values)

    def _run_action(self, action: Action, caller: Caller, values: dict) -> dict:
        services = self.services
        tenant = services.accounts.cached_tenant(caller.account_id, values["IotInstanceId"])
        if tenant is None:
            with services.db.connect() as conn:
                tenant = services.accounts.tenant(conn, caller.account_id, values["IotInstanceId"])
        return action.handler(services, tenant, values)


def _format_and_action(params: dict[str, str], headers: dict[str, str]) -> tuple[str, str | None]:
    """The answer's format and the action's name, as far as the request says them so far (a
    parameter first: a V1 signature covers it; _resolve_action refuses a V1 header's)."""
    fmt = "XML" if params.get("Format", "").upper() == "XML" else "JSON"
    return fmt, params.get("Action") or headers.get("x-acs-action")


def parse_query(text: str) -> list[tuple[str, str]]:
    """`urllib.parse.parse_qsl(text, keep_blank_values=True)`, in a fraction of the time: the
    same pairs, but only fields holding a `+` or a `%` are decoded, ASCII escapes by a table."""
    pairs = []
    for field in text.split("&"):
        name, _, value = field.partition("=")
        if "%" in field or "+" in field:  # most fields need no decoding: one test for both sides
            if "+" in name or "%" in name:
                name = _unquote(name.replace("+", " "))
            if "+" in value or "%" in value:
                value = _unquote(value.replace("+", " "))
        elif not field:
            continue
        pairs.append((name, value))
    return pairs


_ASCII_ESCAPES = {f"{code:02X}": chr(code) for code in range(128)} | {f"{code:02x}": chr(code) for code in range(128)}


def _unquote(text: str) -> str:
    """unquote(text), with escapes of ASCII characters (all a signed request usually holds:
    `%3A` in a Timestamp, `%2B` in a Signature...) decoded by a table; anything else (UTF-8
    sequences, malformed escapes) goes through unquote() itself."""
    first, *rest = text.split("%")
    decoded = [first]
    for part in rest:
        char = _ASCII_ESCAPES.get(part[:2])
        if char is None:
            return unquote(text)
        decoded.append(char)
        decoded.append(part[2:])
    return "".join(decoded)


def _may_hold_nul(text: str) -> bool:
    """Whether parse_query(text) may hold a NUL: only a raw one or `%00` decodes to it."""
    return "%00" in text or "\x00" in text


def _refuse_nul(params: dict[str, str]) -> None:
    """No API value contains NUL, and PostgreSQL cannot store or even compare one (500)."""
    if "\x00" not in "".join(params) and "\x00" not in "".join(params.values()):
        return  # the usual case, in two C-level scans
    for key, value in params.items():
        if "\x00" in key or "\x00" in value:
            raise errors.invalid(key.replace("\x00", "\\0"), "must not contain NUL characters")


# Headers that decide what a request is or how its body is read: the signature is checked on
# one copy, so a second copy could make the request mean something else (x-acs-action).
_SINGLE_HEADERS = frozenset({"authorization", "host", "content-type", "content-length", "transfer-encoding"})


def _refuse_repeated_signed_headers(raw_headers) -> None:
    seen: set[str] = set()
    for raw_name, _ in raw_headers:
        name = raw_name.decode("latin-1")
        if (name in _SINGLE_HEADERS or name.startswith("x-acs-")) and name in seen:
            raise errors.invalid(name, "the header is given more than once")
        seen.add(name)


async def _read_body(receive: Receive, declared: str | None, chunked: bool) -> bytes:
    """The whole body, as Starlette's Request.stream() reads it."""
    if not chunked and (declared is None or declared == "0"):
        return b""  # HTTP/1.1 framing: no Content-Length nor Transfer-Encoding, no body
    # ASCII digits, and a length before int(): int() refuses '²' and strings of 4,300+ digits.
    too_long = declared and declared.isascii() and declared.isdigit() and (
        len(declared) > 18 or int(declared) > MAX_BODY_BYTES)
    if too_long:
        raise errors.invalid("Body", f"the request body must be at most {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise errors.invalid("Body", f"the request body must be at most {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
