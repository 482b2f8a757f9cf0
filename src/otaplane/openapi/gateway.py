"""The RPC endpoint on `/`: read the request, authenticate, parse, dispatch, wrap.

Reading the request happens on the event loop; everything that touches the database runs in
one worker-thread hop, so the loop (and the MQTT broker sharing it) never waits on SQL.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response

from otaplane import errors, ids
from otaplane.errors import ApiError
from otaplane.openapi import envelope
from otaplane.openapi.auth import SignedRequest, authenticate
from otaplane.openapi.params import parse_params
from otaplane.openapi.ratelimit import RateLimiter
from otaplane.openapi.registry import API_VERSION, Action, build_table
from otaplane.services.container import Services

log = logging.getLogger("otaplane.gateway")

MAX_BODY_BYTES = 4 * 1024 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


class Gateway:
    def __init__(self, services: Services):
        self.services = services
        self.actions: dict[str, Action] = build_table()
        settings = services.settings
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_limit_burst)
        self.camel = settings.response_case == "camel"
        self.window_s = settings.signature_window_seconds

    async def handle(self, request: Request) -> Response:
        request_id = ids.request_id()
        query = list(parse_qsl(request.url.query, keep_blank_values=True))
        params = dict(query)
        fmt = "XML" if params.get("Format", "").upper() == "XML" else "JSON"
        action_name = params.get("Action") or request.headers.get("x-acs-action")
        host = request.headers.get("host", "")
        try:
            if request.method not in ("GET", "POST"):
                raise errors.UnsupportedHTTPMethod()
            body = await _read_body(request)
            if body and request.headers.get("content-type", "").startswith(FORM_TYPE):
                form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
                params = {**params, **dict(form)}
            _refuse_nul(params)
            action = self._resolve_action(action_name, params, request)
            signed = SignedRequest(
                method=request.method,
                path=request.url.path,
                query=query,
                params=params,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
            payload = await anyio.to_thread.run_sync(self._process, action, signed)
        except ApiError as error:
            if error.spec.http_status >= 500:
                log.error("request %s failed: %s", request_id, error.code)
            return envelope.failure(action_name, request_id, error, fmt, self.camel, host)
        except Exception:
            log.exception("request %s (%s) failed unexpectedly", request_id, action_name)
            return envelope.failure(action_name, request_id, errors.InternalError(), fmt, self.camel, host)
        return envelope.success(action.name, request_id, payload, fmt, self.camel)

    def _resolve_action(self, action_name: str | None, params: dict[str, str], request: Request) -> Action:
        if not action_name:
            raise errors.missing("Action")
        version = params.get("Version") or request.headers.get("x-acs-version")
        if not version:
            raise errors.missing("Version")
        if version != API_VERSION:
            raise errors.InvalidVersion()
        action = self.actions.get(action_name)
        if action is None or request.method not in action.methods:
            raise errors.InvalidAction()
        return action

    def _process(self, action: Action, signed: SignedRequest) -> dict:
        """Authenticate, throttle, parse and run the action (in a worker thread)."""
        services = self.services
        with services.db.connect() as conn:
            caller = authenticate(signed, conn, services.accounts, self.window_s)  # commits the nonce
            if not self.limiter.allow(caller.access_key_id):
                raise errors.ThrottlingUser()
            values = parse_params(action.all_params, signed.params)
            tenant = services.accounts.tenant(conn, caller.account_id, values["IotInstanceId"])
        return action.handler(services, tenant, values)


def _refuse_nul(params: dict[str, str]) -> None:
    """No API value contains NUL, and PostgreSQL cannot store or even compare one (500)."""
    for key, value in params.items():
        if "\x00" in key or "\x00" in value:
            raise errors.invalid(key.replace("\x00", "\\0"), "must not contain NUL characters")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise errors.invalid("Body", f"the request body must be at most {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise errors.invalid("Body", f"the request body must be at most {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
