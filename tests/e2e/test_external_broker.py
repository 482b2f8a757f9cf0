"""External broker mode (OTAPLANE_MQTT_URL): a real `otaplane serve` that is a client of the
Mosquitto on 127.0.0.1:1883, devices connected to that Mosquitto with paho-mqtt (subscribing to
their own topics themselves: Mosquitto has no server-side subscription), and the HTTP auth/ACL
endpoints an external broker calls.

The Mosquitto is shared (CI, other runs): product and device names are unique, and each server
uses its own shared-subscription group. OTAPLANE_TEST_MOSQUITTO=required (CI) turns an
unreachable Mosquitto into a failure instead of a skip; OTAPLANE_TEST_MOSQUITTO_ADDRESS=host:port
points the tests at another broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid

import httpx
import pytest

from otaplane.services.container import Services
from otaplane.services.devices import DeviceRef
from otaplane.settings import Settings
from tests.e2e.test_device_channel import ACCOUNT, Fleet, _answers_within, unique
from tests.support.clients import SdkCaller
from tests.support.devices import Device, connect, device_password
from tests.support.server import ServerProcess
from tests.support.waiting import eventually

_HOST, _, _PORT = os.environ.get("OTAPLANE_TEST_MOSQUITTO_ADDRESS", "127.0.0.1:1883").rpartition(":")
MOSQUITTO = (_HOST, int(_PORT))  # the shared broker (CI: the system Mosquitto)
# The system Mosquitto allows anonymous clients, so it accepts any login: these show that the
# credentials are passed through, never logged, and that /mqtt/auth knows otaplane's own user.
SERVICE_USER, SERVICE_PASSWORD = "otaplane-svc", "s3cret-" + uuid.uuid4().hex[:8]


def _mosquitto_up() -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(MOSQUITTO) == 0


@pytest.fixture(scope="module")
def mosquitto():
    if not _mosquitto_up():
        message = f"no MQTT broker (Mosquitto) on {MOSQUITTO[0]}:{MOSQUITTO[1]}"
        if os.environ.get("OTAPLANE_TEST_MOSQUITTO", "") == "required":
            pytest.fail(f"{message}, and OTAPLANE_TEST_MOSQUITTO=required")
        pytest.skip(f"{message} (set OTAPLANE_TEST_MOSQUITTO=required to make this a failure)")
    return MOSQUITTO


@pytest.fixture(scope="module", params=["sqlite", "postgresql"] if os.environ.get("OTAPLANE_TEST_POSTGRES_URL")
                else ["sqlite"])
def ext_server(request, mosquitto, make_server):
    host, port = mosquitto
    env = {"OTAPLANE_MQTT_URL": f"mqtt://{SERVICE_USER}:{SERVICE_PASSWORD}@{host}:{port}",
           "OTAPLANE_MQTT_SHARE_GROUP": "otaplane-test-" + uuid.uuid4().hex[:10]}
    return make_server(request.param, "--rate-limit", "0", env=env)


@pytest.fixture(scope="module")
def api(ext_server) -> SdkCaller:
    return SdkCaller("tea-v3", ext_server.endpoint, *ext_server.create_key(ACCOUNT))


@pytest.fixture(scope="module")
def local(ext_server):
    services = Services.build(Settings(data_dir=ext_server.data_dir, database_url=ext_server.database_url))
    yield services
    services.close()


@pytest.fixture(scope="module")
def tenant(local, api):
    return local.accounts.tenant_by_name(ACCOUNT)


class ExternalFleet(Fleet):
    def connect(self, name: str, subscribe: bool = True, **options) -> Device:
        device = connect(MOSQUITTO[1], self.product_key, name, "ignored-by-mosquitto", host=MOSQUITTO[0],
                         **options)
        self.opened.append(device)
        if subscribe:  # what EMQX's auto_subscribe (or the embedded broker) would do for it
            for topic in (device.upgrade_topic, device.get_reply_topic):
                assert [code.value for code in device.subscribe(topic)] == [1]  # granted QoS 1
        return device


@pytest.fixture()
def fleet(ext_server, api):
    opened: list[Device] = []
    yield ExternalFleet(ext_server, api, opened)
    for device in opened:
        device.close()


def _push(local, tenant, fleet, name, firmware_id):
    return local.device_ota.push(tenant, DeviceRef(product_key=fleet.product_key, device_name=name), firmware_id)


def test_the_server_logs_the_broker_without_the_password(ext_server):
    logs = ext_server.logs()
    assert f"connected to the MQTT broker mqtt://{SERVICE_USER}@{MOSQUITTO[0]}:{MOSQUITTO[1]}" in logs, logs
    assert SERVICE_PASSWORD not in logs


def test_version_report_through_the_broker_shows_in_the_openapi(fleet):
    name = fleet.register()
    device = fleet.connect(name)
    assert fleet.detail(name)["Status"] == "UNACTIVE"
    device.inform("1.2.3")
    device.inform("0.9", module="MCU")
    eventually(lambda: fleet.module_versions(name) == {"default": "1.2.3", "MCU": "0.9"})
    detail = fleet.detail(name)
    assert detail["FirmwareVersion"] == "1.2.3"
    # The broker reports no connects: a device that spoke is activated, not ONLINE.
    assert detail["Status"] == "OFFLINE"


def test_a_device_deleted_and_registered_again_elsewhere_keeps_reporting(fleet, local, tenant):
    """Another replica (here: this test process) deletes the device and registers its name again:
    this server's identity cache still held the old row id for 30 s, so the reports failed on a
    foreign key (with a traceback each) and were lost (found by an audit of two replicas)."""
    name = fleet.register()
    device = fleet.connect(name)
    device.inform("1.0.0")
    eventually(lambda: fleet.module_versions(name) == {"default": "1.0.0"})  # the id is cached now
    local.devices.delete(tenant, DeviceRef(product_key=fleet.product_key, device_name=name))
    local.devices.register(tenant, fleet.product_key, name, None)
    device.inform("2.0.0")
    eventually(lambda: fleet.module_versions(name) == {"default": "2.0.0"})
    assert "Traceback" not in fleet.server.logs()


def test_push_reaches_the_device_with_the_exact_payload_and_firmware_get_answers(fleet, local, tenant):
    from otaplane.devices import messages

    content = os.urandom(50_000)
    firmware_id = fleet.firmware(content)
    name = fleet.register()
    device = fleet.connect(name)
    device.firmware_get(request_id="5")
    empty = device.expect(device.get_reply_topic).json()
    assert (empty["id"], empty["code"], empty["data"]) == ("5", 200, {})

    pushed = _push(local, tenant, fleet, name, firmware_id)
    message = device.expect(device.upgrade_topic)
    assert message.qos == 1
    device_id = local.devices.credentials(fleet.product_key, name).device_id
    package = local.device_ota.offer(device_id, None)
    body = message.json()
    assert body["id"] == pushed.message_id and body["data"]["md5"] == hashlib.md5(content).hexdigest()
    # Exactly what the service's payload builder makes (the URL is presigned per call: compare without it).
    expected = json.loads(messages.upgrade_push(package))
    assert {**body, "data": {**body["data"], "url": None}} == {**expected, "data": {**expected["data"], "url": None}}
    assert httpx.get(body["data"]["url"], timeout=30).content == content
    eventually(lambda: local.device_ota.offer(device_id, None).delivered)
    device.expect_nothing(device.upgrade_topic, within=2.5)  # published once

    device.firmware_get(request_id="6")
    reply = device.expect(device.get_reply_topic).json()
    assert reply["id"] == "6" and reply["data"]["version"] == "2.0.0"
    assert reply["data"]["md5"] == hashlib.md5(content).hexdigest()

    # Progress and the final version report go through the same service code.
    device.progress(50, "downloading")
    eventually(lambda: local.device_ota.offer(device_id, None).progress == 50)
    device.inform("2.0.0")
    eventually(lambda: local.device_ota.offer(device_id, None) is None)


def test_legacy_request_through_the_broker_gets_one_answer(fleet, local, tenant):
    # otaplane subscribes to the request topic and answers on it: its own answer comes back to
    # it through the broker and must not be taken for a request (that would answer forever).
    content = os.urandom(3_000)
    firmware_id = fleet.firmware(content)
    name = fleet.register()
    device = fleet.connect(name)
    topic = f"/ota/device/request/{fleet.product_key}/{name}"
    assert [code.value for code in device.subscribe(topic)] == [1]
    pushed = _push(local, tenant, fleet, name, firmware_id)
    device.publish(topic, {"id": 21, "params": {"version": "1.0.0"}})
    answers = _answers_within(device, topic, 3.0)
    assert len(answers) == 1, answers
    assert answers[0]["id"] == pushed.message_id and answers[0]["message"] == "success"
    assert answers[0]["data"]["md5"] == hashlib.md5(content).hexdigest()
    assert httpx.get(answers[0]["data"]["url"], timeout=30).content == content


def test_a_device_reads_a_package_block_by_block_through_the_broker(fleet, local):
    """DownloadProtocol MQTT through an external broker: otaplane answers thing/file/download."""
    from otaplane.devices import messages
    from otaplane.store import device_ota as store

    content = os.urandom(12_345)
    firmware_id = fleet.firmware(content)
    with local.db.connect() as conn:
        stream_id = store.firmware_row(conn, None, firmware_id)["id"]
    device = fleet.connect(fleet.register())
    base = f"/sys/{fleet.product_key}/{device.device_name}/thing/file"
    assert [code.value for code in device.subscribe(f"{base}/download_reply")] == [1]
    received = b""
    while len(received) < len(content):
        device.publish(f"{base}/download", {"id": "1", "params": {
            "fileToken": "t1", "fileInfo": {"streamId": stream_id, "fileId": 1},
            "fileBlock": {"size": 5120, "offset": len(received)}}}, qos=0)
        reply = device.expect(f"{base}/download_reply").payload
        length = int.from_bytes(reply[:2], "big")
        header, data = json.loads(reply[2:2 + length]), reply[2 + length:-2]
        assert header["code"] == 200 and header["data"]["bOffset"] == len(received), header
        assert int.from_bytes(reply[-2:], "little") == messages.crc16_arc(data)
        received += data
    assert received == content


def test_a_device_that_missed_a_push_gets_it_after_its_version_report(fleet, local, tenant):
    firmware_id = fleet.firmware(os.urandom(1000))
    name = fleet.register()
    pushed = _push(local, tenant, fleet, name, firmware_id)  # nobody listens: the broker drops it
    device_id = local.devices.credentials(fleet.product_key, name).device_id
    eventually(lambda: local.device_ota.offer(device_id, None).delivered)
    device = fleet.connect(name)
    device.expect_nothing(device.upgrade_topic, within=1)
    device.inform("1.0.0")  # what SDKs do after connecting
    assert device.expect(device.upgrade_topic).json()["id"] == pushed.message_id


def test_the_cli_push_is_published_by_the_server(fleet, ext_server):
    firmware_id = fleet.firmware(os.urandom(1000))
    name = fleet.register()
    device = fleet.connect(name)
    out = ext_server.cli("devices", "push", "--product", fleet.product_key, "--device", name, "--firmware",
                         firmware_id, "--account", ACCOUNT, "--json")
    message_id = json.loads(out.stdout)["MessageId"]
    assert device.expect(device.upgrade_topic).json()["id"] == message_id


def test_messages_of_unknown_devices_are_ignored(fleet, ext_server):
    product_key = fleet.product_key
    ghost = connect(MOSQUITTO[1], product_key, unique("ghost"), "x", host=MOSQUITTO[0])
    try:
        ghost.subscribe(ghost.get_reply_topic)
        ghost.firmware_get()
        ghost.expect_nothing(ghost.get_reply_topic, within=1.5)
    finally:
        ghost.close()


# --- HTTP auth and ACL endpoints ---------------------------------------------------------------
def _login(fleet, name: str) -> dict[str, str]:
    secret = fleet.secrets[name]
    bare, ts = f"{fleet.product_key}&{name}", "1795644898"
    return {"clientid": f"{bare}|securemode=3,signmethod=hmacsha1,timestamp={ts}|",
            "username": f"{name}&{fleet.product_key}",
            "password": device_password(secret, bare, name, fleet.product_key, ts)}


def test_http_auth_allows_the_right_password_and_denies_the_rest(fleet, ext_server):
    name = fleet.register()
    url = f"{ext_server.base_url}/mqtt/auth"
    good = _login(fleet, name)
    for send in ({"json": good}, {"data": good}):
        response = httpx.post(url, **send)
        assert response.status_code == 200
        assert response.json()["result"] == "allow" and response.json()["is_superuser"] is False
    wrong = {**good, "password": "0" * 40}
    unknown = {**good, "username": f"nobody1234&{fleet.product_key}"}
    for body in (wrong, unknown, {}, {"username": "x"}, {"clientid": 5, "username": ["a"], "password": None}):
        response = httpx.post(url, json=body)
        assert response.status_code == 200 and response.json()["result"] == "deny", body
    for raw, ctype in ((b"{not json", "application/json"), (b"\xff\xfe\x00", "application/x-www-form-urlencoded"),
                       (b"[1,2]", "application/json"), (b"x" * 100_000, "text/plain"), (b"", "")):
        response = httpx.post(url, content=raw, headers={"content-type": ctype} if ctype else {})
        assert response.status_code == 200 and response.json()["result"] == "deny", raw[:20]


def test_http_auth_and_acl_know_otaplanes_own_broker_user(ext_server):
    base = ext_server.base_url
    own = httpx.post(f"{base}/mqtt/auth", data={"clientid": "otaplane-1", "username": SERVICE_USER,
                                                "password": SERVICE_PASSWORD}).json()
    assert (own["result"], own["is_superuser"]) == ("allow", True)
    wrong = httpx.post(f"{base}/mqtt/auth", json={"username": SERVICE_USER, "password": "nope"}).json()
    assert (wrong["result"], wrong["is_superuser"]) == ("deny", False)
    acl = httpx.post(f"{base}/mqtt/acl", json={"username": SERVICE_USER, "topic": "/ota/device/inform/+/+",
                                               "action": "subscribe"}).json()
    assert acl["result"] == "allow"


def test_http_acl_allows_own_topics_only(fleet, ext_server):
    name, other = fleet.register(), fleet.register()
    url = f"{ext_server.base_url}/mqtt/acl"
    user = f"{name}&{fleet.product_key}"

    def ask(**fields):
        response = httpx.post(url, json={"clientid": "c", "username": user, **fields})
        assert response.status_code == 200
        return response.json()["result"]

    pk = fleet.product_key
    assert ask(topic=f"/ota/device/inform/{pk}/{name}", action="publish") == "allow"
    assert ask(topic=f"/ota/device/upgrade/{pk}/{name}", action="subscribe") == "allow"
    assert ask(topic=f"/sys/{pk}/{name}/thing/ota/firmware/get", action="publish") == "allow"
    assert ask(topic=f"/ota/device/upgrade/{pk}/{other}", action="subscribe") == "deny"
    assert ask(topic=f"/ota/device/inform/{pk}/{other}", action="publish") == "deny"
    assert ask(topic="#", action="subscribe") == "deny"
    assert ask(topic=f"/ota/device/inform/{pk}/{name}", action="delete") == "deny"
    assert ask(topic=f"/ota/device/upgrade/{pk}/{name}", acc="1") == "allow"  # mosquitto-go-auth
    assert ask(topic=f"/ota/device/upgrade/{pk}/{other}", acc="4") == "deny"
    garbage = httpx.post(url, content=b"\x00garbage", headers={"content-type": "application/json"})
    assert garbage.status_code == 200 and garbage.json()["result"] == "deny"


# --- a private broker: credentials, and the broker going away -----------------------------------
@pytest.fixture()
def private_mosquitto(tmp_path):
    from tests.support.mosquitto import PrivateMosquitto

    if not PrivateMosquitto.available():
        pytest.skip("mosquitto and mosquitto_passwd are not installed")
    started: list[PrivateMosquitto] = []

    def start(users: dict[str, str] | None = None) -> PrivateMosquitto:
        broker = PrivateMosquitto(tmp_path / f"mosquitto{len(started)}", users).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def test_otaplane_logs_in_with_the_urls_credentials_and_never_logs_the_password(private_mosquitto, make_server):
    password = "pw-" + uuid.uuid4().hex
    broker = private_mosquitto({"otaplane": password})
    good = make_server("sqlite", env={"OTAPLANE_MQTT_URL": f"mqtt://otaplane:{password}@127.0.0.1:{broker.port}"})
    assert f"connected to the MQTT broker mqtt://otaplane@127.0.0.1:{broker.port}" in good.logs()
    # A wrong password: the server still starts, keeps retrying, and logs no password.
    bad = make_server("sqlite", env={"OTAPLANE_MQTT_URL": f"mqtt://otaplane:wrong{password}@127.0.0.1:{broker.port}",
                                     "OTAPLANE_MQTT_CONNECT_TIMEOUT_SECONDS": "2"})
    assert httpx.get(f"{bad.base_url}/healthz").status_code == 200
    eventually(lambda: "reconnecting in" in bad.logs())
    assert "connected to the MQTT broker" not in bad.logs()
    for server in (good, bad):
        assert password not in server.logs()


def test_a_push_made_while_the_broker_is_down_is_published_when_it_is_back(private_mosquitto, make_server):
    broker = private_mosquitto()
    server = make_server("sqlite", "--rate-limit", "0",
                         env={"OTAPLANE_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}"})
    api = SdkCaller("tea-v3", server.endpoint, *server.create_key(ACCOUNT))
    services = Services.build(Settings(data_dir=server.data_dir))
    opened: list[Device] = []
    try:
        fleet = Fleet(server, api, opened)
        firmware_id = fleet.firmware(os.urandom(1000))
        name = fleet.register()
        device_id = services.devices.credentials(fleet.product_key, name).device_id

        broker.stop()
        eventually(lambda: "reconnecting in" in server.logs())
        pushed = services.device_ota.push(services.accounts.tenant_by_name(ACCOUNT),
                                          DeviceRef(product_key=fleet.product_key, device_name=name), firmware_id)
        time.sleep(1.5)
        assert not services.device_ota.offer(device_id, None).delivered  # nothing took it

        broker.start()  # same port
        device = connect(broker.port, fleet.product_key, name, "x")
        opened.append(device)
        device.subscribe(device.upgrade_topic)
        # otaplane reconnects (backoff up to 30 s) and publishes the pending row.
        eventually(lambda: services.device_ota.offer(device_id, None).delivered, timeout=40)
        try:
            message = device.expect(device.upgrade_topic, timeout=3)
        except AssertionError:  # published before the device subscribed: its version report re-offers it
            device.inform("1.0.0")
            message = device.expect(device.upgrade_topic)
        assert message.json()["id"] == pushed.message_id
    finally:
        for device in opened:
            device.close()
        services.close()


@pytest.fixture(scope="module")
def second_replica(ext_server):
    """Another process on the same database, data dir, broker and shared-subscription group."""
    replica = ServerProcess(ext_server.data_dir, ext_server.database_url, ("--rate-limit", "0"),
                            dict(ext_server.extra_env))
    try:
        yield replica.start()
    finally:
        replica.stop()


def _upgrade_pushes(device: Device) -> list[int]:
    """The ids of every push the device has received so far."""
    ids = []
    while not device.inbox.empty():
        message = device.inbox.get_nowait()
        if message.topic == device.upgrade_topic:
            ids.append(message.json()["id"])
    return ids


def test_two_replicas_publish_a_push_made_elsewhere_once(fleet, local, tenant, second_replica):
    """A push made by a third process (the CLI; here this test's services) wakes no replica:
    both find it pending at their next sweep. Each used to publish it before either recorded it
    delivered (an audit saw 15 of 100 devices get it twice); now the first to claim it does."""
    firmware_id = fleet.firmware(os.urandom(1000))
    names = [fleet.register() for _ in range(60)]
    devices = {name: fleet.connect(name) for name in names}
    pushed = {name: _push(local, tenant, fleet, name, firmware_id).message_id for name in names}
    received: dict[str, list[int]] = {name: [] for name in names}

    def everyone_got_one() -> bool:
        for name, device in devices.items():
            received[name] += _upgrade_pushes(device)
        return all(received.values())

    eventually(everyone_got_one)
    time.sleep(2)  # a second replica's copy would arrive within its next sweep (every second)
    everyone_got_one()
    assert {name: ids for name, ids in received.items() if ids != [pushed[name]]} == {}


def test_a_device_reporting_to_either_replica_is_re_offered_once_per_interval(fleet, local, tenant, second_replica):
    """Version reports that the shared subscription hands to both replicas: one re-offer between
    them within RE_OFFER_INTERVAL_S, not one per replica."""
    firmware_id = fleet.firmware(os.urandom(1000))
    name = fleet.register()
    pushed = _push(local, tenant, fleet, name, firmware_id)
    device_id = local.devices.credentials(fleet.product_key, name).device_id
    eventually(lambda: local.device_ota.offer(device_id, None).delivered)  # published to nobody
    device = fleet.connect(name)
    for request_id in range(1, 9):  # the broker shares them out between the two replicas
        device.inform("1.0.0", request_id=request_id)
    device.expect(device.upgrade_topic)
    time.sleep(2)
    assert [pushed.message_id, *_upgrade_pushes(device)] == [pushed.message_id]
