"""HTTP authentication and authorisation for an external MQTT broker (EMQX's HTTP authn/authz,
mosquitto-go-auth's HTTP backend): the broker asks, otaplane answers from the device registry.

`POST /mqtt/auth` (form or JSON: clientid, username, password) -> 200
    {"result": "allow"|"deny", "is_superuser": bool, "ok": bool, "error": str}
`POST /mqtt/acl` (clientid, username, topic, action publish|subscribe, or mosquitto-go-auth's
    `acc` 1 read / 2 write / 3 both / 4 subscribe) -> 200 with the same shape.

Devices sign their CONNECT as the Aliyun SDKs do (devices/auth.py) and reach only their own
topics (devices/topics.py). otaplane's own client (the user in OTAPLANE_MQTT_URL) is a
superuser. Anything malformed is a deny, never an error.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any
from urllib.parse import parse_qs

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from otaplane.devices import auth, topics

log = logging.getLogger("otaplane.devices")

MAX_BODY = 16 * 1024
MAX_FIELD = 1024


def _answer(allow: bool, superuser: bool = False, reason: str = "") -> JSONResponse:
    return JSONResponse({"result": "allow" if allow else "deny", "is_superuser": bool(allow and superuser),
                         "ok": allow, "error": "" if allow else reason})


async def _fields(request: Request) -> dict[str, str]:
    """The request's fields (JSON object, urlencoded form or query string), strings only."""
    body = await request.body()
    raw: dict[str, Any] = dict(request.query_params)
    if len(body) > MAX_BODY:
        return {}
    if body:
        parsed: Any = None
        text = body.decode("utf-8", errors="replace")
        if "json" in request.headers.get("content-type", "") or text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        else:
            parsed = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
        if isinstance(parsed, dict):
            raw.update(parsed)
    fields = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(key, str) and isinstance(value, str) and len(value) <= MAX_FIELD:
            fields[key.lower()] = value
    return fields


def _service_user(services: Any) -> tuple[str, str] | None:
    """otaplane's own broker login (from OTAPLANE_MQTT_URL), if it has one."""
    url = services.settings.mqtt_url
    if not url:
        return None
    from otaplane.devices.external import parse_mqtt_url

    try:
        address = parse_mqtt_url(url)
    except ValueError:
        return None
    if not address.username:
        return None
    return address.username, address.password or ""


def _is_service_user(services: Any, username: str | None) -> bool:
    service = _service_user(services)
    return service is not None and username is not None and hmac.compare_digest(service[0].encode(),
                                                                                username.encode())


def check_device(services: Any, client_id: str | None, username: str | None, password: str | None) -> tuple[bool, str]:
    """(allowed, reason) for a device CONNECT (runs in a worker thread: a database lookup)."""
    try:
        login = auth.parse_login(client_id, username)
    except auth.LoginRefused as refusal:
        return False, str(refusal)
    credentials = services.devices.credentials(login.product_key, login.device_name)
    if credentials is None:
        return False, "no such device"
    if not auth.verify(login, credentials.secret, password):
        return False, "wrong password"
    if credentials.disabled:
        return False, "device is disabled"
    return True, ""


def make_endpoints(services: Any):
    async def mqtt_auth(request: Request) -> JSONResponse:
        try:
            fields = await _fields(request)
            client_id, username, password = fields.get("clientid"), fields.get("username"), fields.get("password")
            service = _service_user(services)
            if service is not None and _is_service_user(services, username):
                ok = hmac.compare_digest(service[1].encode(), (password or "").encode())
                return _answer(ok, superuser=True, reason="wrong password")
            allowed, reason = await anyio.to_thread.run_sync(check_device, services, client_id, username, password)
            if not allowed:
                log.info("MQTT auth: refused %r: %s", username, reason)
            return _answer(allowed, reason=reason)
        except Exception:
            log.exception("MQTT auth request failed")
            return _answer(False, reason="error")

    async def mqtt_acl(request: Request) -> JSONResponse:
        try:
            fields = await _fields(request)
            username, topic = fields.get("username"), fields.get("topic")
            if not topic:
                return _answer(False, reason="no topic")
            if _is_service_user(services, username):
                return _answer(True, superuser=True)
            try:
                product_key, device_name = auth.parse_username(username)
            except auth.LoginRefused as refusal:
                return _answer(False, reason=str(refusal))
            action = (fields.get("action") or "").lower()
            acc = fields.get("acc", "")
            wants_publish = action == "publish" or acc in ("2", "3")
            wants_subscribe = action == "subscribe" or acc in ("1", "3", "4")
            if not wants_publish and not wants_subscribe:
                return _answer(False, reason="unknown action")
            allowed = ((not wants_publish or topics.may_publish(topic, product_key, device_name))
                       and (not wants_subscribe or topics.may_subscribe(topic, product_key, device_name)))
            return _answer(allowed, reason="not the device's topic")
        except Exception:
            log.exception("MQTT ACL request failed")
            return _answer(False, reason="error")

    return mqtt_auth, mqtt_acl
