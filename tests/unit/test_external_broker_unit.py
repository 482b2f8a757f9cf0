"""External broker mode: the broker URL, and the HTTP auth/ACL endpoints' decisions."""

from __future__ import annotations

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from otaplane.devices.external import ExternalChannel, parse_mqtt_url
from otaplane.devices.http_auth import make_endpoints


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker", ("broker", 1883, False, None, None)),
    ("mqtts://broker", ("broker", 8883, True, None, None)),
    ("mqtt://u:p%40ss@10.0.0.1:1884", ("10.0.0.1", 1884, False, "u", "p@ss")),
    ("mqtt://user@[::1]:1885", ("::1", 1885, False, "user", None)),
])
def test_mqtt_urls(url, expected):
    address = parse_mqtt_url(url)
    assert (address.host, address.port, address.tls, address.username, address.password) == expected


@pytest.mark.parametrize("url", ["http://broker", "mqtt://", "mqtt://host:notaport", "broker:1883"])
def test_bad_mqtt_urls(url):
    with pytest.raises(ValueError):
        parse_mqtt_url(url)


def test_the_password_is_never_in_the_address_text():
    address = parse_mqtt_url("mqtt://svc:hunter2@broker:1883")
    assert str(address) == "mqtt://svc@broker:1883" and "hunter2" not in repr(address)


def test_upstream_filters_are_shared_unless_the_group_is_empty():
    services = type("S", (), {})()
    shared = ExternalChannel(services, "mqtt://b", "grp")._filters()
    assert ("$share/grp/ota/device/inform/+/+", 1) not in shared  # the topic keeps its leading "/"
    assert ("$share/grp//ota/device/inform/+/+", 1) in shared
    assert ExternalChannel(services, "mqtt://b", "")._filters()[0] == ("/ota/device/inform/+/+", 1)


class _Settings:
    mqtt_url = "mqtt://svc:pw@broker"


class _Devices:
    def credentials(self, product_key, device_name):
        raise AssertionError("no device lookups expected")


class _Services:
    settings = _Settings()
    devices = _Devices()


class _Client:
    """Synchronous calls to the endpoints, in process."""

    def __init__(self):
        auth, acl = make_endpoints(_Services())
        self.app = Starlette(routes=[Route("/mqtt/auth", auth, methods=["POST"]),
                                     Route("/mqtt/acl", acl, methods=["POST"])])

    def post(self, path: str, **options) -> httpx.Response:
        async def call():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as c:
                return await c.post(path, **options)

        return anyio.run(call)


@pytest.fixture()
def client():
    return _Client()


def test_the_service_user_is_a_superuser(client):
    assert client.post("/mqtt/auth", json={"username": "svc", "password": "pw"}).json()["is_superuser"] is True
    assert client.post("/mqtt/auth", data={"username": "svc", "password": "px"}).json()["result"] == "deny"
    assert client.post("/mqtt/acl", json={"username": "svc", "topic": "#", "action": "subscribe"}).json()[
        "result"] == "allow"


@pytest.mark.parametrize("body", [b"", b"{", b"null", b"[]", b'{"username": 1}', b"\xff" * 10, b"a=%ff&b"])
def test_garbage_is_denied_without_lookups(client, body):
    for path in ("/mqtt/auth", "/mqtt/acl"):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200 and response.json()["result"] == "deny"
