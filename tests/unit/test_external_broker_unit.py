"""External broker mode: the broker URL, and the HTTP auth/ACL endpoints' decisions."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from otaplane.devices.external import UPSTREAM_FILTERS, ExternalChannel, parse_mqtt_url
from otaplane.devices.http_auth import make_endpoints
from otaplane.services.devices import DeviceRef
from otaplane.services.products import NewProduct
from otaplane.sim import mqtt as mqtt_codec
from tests.support.services import fresh_services


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


class _FakeBroker:
    """Just enough of a broker for otaplane's client: CONNACK, SUBACK, then `deliveries` sent to
    it as PUBLISH packets (QoS 1); the PUBACKs it gets back are kept. For what Mosquitto never
    forwards."""

    def __init__(self, deliveries: list[tuple[str, bytes]]):
        self.deliveries = deliveries
        self.acknowledged: list[int] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._packet(reader)  # CONNECT
        writer.write(b"\x20\x02\x00\x00")
        first, body = await self._packet(reader)
        assert first >> 4 == 8, "SUBSCRIBE expected"
        writer.write(mqtt_codec.packet(0x90, body[:2] + b"\x01" * len(UPSTREAM_FILTERS)))
        for packet_id, (topic, payload) in enumerate(self.deliveries, start=1):
            writer.write(mqtt_codec.publish_packet(topic, payload, qos=1, packet_id=packet_id))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                first, body = await self._packet(reader)
                if first >> 4 == 4:  # PUBACK
                    self.acknowledged.append(int.from_bytes(body[:2], "big"))

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        while True:
            byte = (await reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                return first, await reader.readexactly(length)


def test_a_wildcard_topic_from_the_broker_is_dropped_and_the_next_message_handled(tmp_path, caplog):
    """A topic name with a wildcard made aiomqtt raise inside paho's read loop, which then handled
    that packet again and again: the channel spun and never read another message."""
    with fresh_services("sqlite", tmp_path, None) as services:
        services.accounts.create_key("ext")
        tenant = services.accounts.tenant_by_name("ext")
        product = services.products.create(tenant, NewProduct(product_name="ext", node_type=0))
        services.devices.register(tenant, product.product_key, "ext-dev", None)
        report = b'{"id":1,"params":{"version":"1.0.1"}}'
        broker = _FakeBroker([(f"/ota/device/inform/{product.product_key}/+", report),
                              (f"/ota/device/inform/{product.product_key}/ext-dev", report)])
        ref = DeviceRef(product_key=product.product_key, device_name="ext-dev")

        def versions() -> dict[str, str]:
            return {m.module_name: m.version for m in services.devices.module_versions(tenant, ref)[1]}

        async def scenario():
            await broker.start()
            channel = ExternalChannel(services, broker.url, "")
            await channel.start()
            try:
                with anyio.fail_after(10):
                    while versions() != {"default": "1.0.1"} or broker.acknowledged != [1, 2]:
                        await asyncio.sleep(0.05)
            finally:
                await channel.stop()
                broker.server.close()

        anyio.run(scenario)
    dropped = [r for r in caplog.records if "/+" in r.getMessage()]
    assert len(dropped) == 1, caplog.text
    assert dropped[0].levelno == logging.WARNING and not dropped[0].exc_info
