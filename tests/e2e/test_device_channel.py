"""The device channel end to end: a real server process with its embedded MQTT broker, devices
registered through the OpenAPI and connected with paho-mqtt as the SDKs connect, pushes made
through DeviceOtaService against the server's database (as the job worker and the
`otaplane devices push` CLI do) and delivered by the server."""

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
from otaplane.services.devices import MAX_MODULES_PER_DEVICE, DeviceRef
from otaplane.settings import Settings
from otaplane.sim import mqtt as mqtt_codec
from tests.support.clients import SdkCaller
from tests.support.devices import ConnectRefused, Device, connect, device_password, raw_connect
from tests.support.server import ServerProcess
from tests.support.uploads import post_upload
from tests.support.waiting import eventually

ACCOUNT = "device-channel-tests"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"




@pytest.fixture(scope="module")
def api(server) -> SdkCaller:
    return SdkCaller("tea-v3", server.endpoint, *server.create_key(ACCOUNT))


@pytest.fixture(scope="module")
def local(server):
    """The services of the test process on the server's database (what the CLI and the job
    worker use): pushes written here are delivered by the server."""
    services = Services.build(Settings(data_dir=server.data_dir, database_url=server.database_url))
    yield services
    services.close()


@pytest.fixture(scope="module")
def tenant(local, api):
    return local.accounts.tenant_by_name(ACCOUNT)


@pytest.fixture()
def devices():
    """Devices connected by a test, closed after it."""
    opened: list[Device] = []
    yield opened
    for device in opened:
        device.close()


class Fleet:
    """A product with registered devices, on one server."""

    def __init__(self, server: ServerProcess, api: SdkCaller, opened: list[Device]):
        self.server = server
        self.api = api
        self.opened = opened
        body = api.call("CreateProduct", {"ProductName": unique("dc_"), "NodeType": 0})
        assert body["Success"], body
        self.product_key = body["ProductKey"]
        self.secrets: dict[str, str] = {}

    def register(self, name: str | None = None) -> str:
        name = name or unique("dev")
        data = self.api.call("RegisterDevice", {"ProductKey": self.product_key, "DeviceName": name})["Data"]
        self.secrets[name] = data["DeviceSecret"]
        return name

    def connect(self, name: str, **options) -> Device:
        device = connect(self.server.mqtt_port, self.product_key, name, self.secrets[name], **options)
        self.opened.append(device)
        return device

    def detail(self, name: str) -> dict:
        body = self.api.call("QueryDeviceDetail", {"ProductKey": self.product_key, "DeviceName": name})
        assert body["Success"], body
        return body["Data"]

    def module_versions(self, name: str) -> dict[str, str]:
        body = self.api.call("ListOTAModuleVersionsByDevice", {
            "ProductKey": self.product_key, "DeviceName": name, "CurrentPage": 1, "PageSize": 50})
        return {m["ModuleName"]: m["ModuleVersion"] for m in body["Data"]["SimpleOTAModuleInfo"]}

    def firmware(self, content: bytes, **extra) -> str:
        generated = self.api.call("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
        assert post_upload(generated, content).status_code in (200, 204)
        body = self.api.call("CreateOTAFirmware", {
            "ProductKey": self.product_key, "FirmwareName": unique("fw-"), "DestVersion": "2.0.0",
            "FirmwareUrl": generated["FirmwareUrl"], **extra})
        assert body["Success"], body
        return body["Data"]["FirmwareId"]

    def upload(self, content: bytes) -> str:
        generated = self.api.call("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
        assert post_upload(generated, content).status_code in (200, 204)
        return generated["FirmwareUrl"]


@pytest.fixture()
def fleet(server, api, devices) -> Fleet:
    return Fleet(server, api, devices)


def push(local, tenant, fleet: Fleet, name: str, firmware_id: str):
    return local.device_ota.push(tenant, DeviceRef(product_key=fleet.product_key, device_name=name), firmware_id)


def device_id(local, fleet: Fleet, name: str) -> int:
    return local.devices.credentials(fleet.product_key, name).device_id


# --- connect, status, refusals ------------------------------------------------------------------
def test_connect_marks_the_device_online_and_disconnect_offline(fleet):
    name = fleet.register()
    assert fleet.detail(name)["Status"] == "UNACTIVE"
    device = fleet.connect(name)
    detail = eventually(lambda: (d := fleet.detail(name))["Status"] == "ONLINE" and d)
    assert detail["IpAddress"] == "127.0.0.1"
    assert detail["UtcOnline"].endswith("Z") and detail["UtcActive"] == detail["UtcOnline"]
    device.close()
    eventually(lambda: fleet.detail(name)["Status"] == "OFFLINE")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"] if os.environ.get("OTAPLANE_TEST_POSTGRES_URL")
                         else ["sqlite"])
def test_devices_of_a_killed_server_go_offline_once_its_heartbeat_is_stale(make_server, backend):
    """kill -9: no shutdown code marks the devices OFFLINE. The next server (or a replica) finds
    the dead process's heartbeat stale (6 beats, here 6 x 1 s) and does."""
    server = make_server(backend, "--rate-limit", "0", env={"OTAPLANE_CHANNEL_HEARTBEAT_SECONDS": "1"})
    key = server.create_key(ACCOUNT)
    opened: list[Device] = []
    fleet = Fleet(server, SdkCaller("tea-v3", server.endpoint, *key), opened)
    name = fleet.register()
    fleet.connect(name)
    eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
    killed_at = time.monotonic()
    server.kill()
    server.start()  # new ports: the device cannot come back by itself
    fleet.api = SdkCaller("tea-v3", server.endpoint, *key)
    try:
        status = fleet.detail(name)["Status"]
        if time.monotonic() - killed_at < 4:  # a slow restart may already be past the 6 s window
            assert status == "ONLINE"  # what the dead process left behind
        eventually(lambda: fleet.detail(name)["Status"] == "OFFLINE", timeout=20)
        assert "devices of a server process that stopped answering are OFFLINE now" in server.logs()
    finally:
        for device in opened:
            device.close()


@pytest.mark.parametrize("form, method", [
    ("pylk", "hmacsha1"), ("lsdk4", "hmacsha256"), ("iotkit3", "hmacsha256"), ("plain", "hmacmd5"),
    ("pylk", "hmacmd5"), ("lsdk4", "hmacsha1"),
])
def test_each_sdk_client_id_form_and_sign_method_connects(fleet, form, method):
    name = fleet.register()
    fleet.connect(name, form=form, method=method)
    eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")


def test_wrong_password_unknown_device_and_disabled_device_are_refused_at_connect(fleet, local):
    name = fleet.register()
    port = fleet.server.mqtt_port
    with pytest.raises(ConnectRefused):
        connect(port, fleet.product_key, name, "not-the-secret")
    with pytest.raises(ConnectRefused):
        connect(port, fleet.product_key, name, fleet.secrets[name], password="0" * 40)
    with pytest.raises(ConnectRefused):
        connect(port, fleet.product_key, "no-such-device", fleet.secrets[name])
    with pytest.raises(ConnectRefused):
        connect(port, "a1NoSuchPK", name, fleet.secrets[name])
    assert fleet.detail(name)["Status"] == "UNACTIVE"

    from otaplane.store import devices as device_store  # no API disables a device yet (DisableThing)

    with local.db.begin() as conn:
        device_store.update(conn, device_id(local, fleet, name), {"disabled": True})
    with pytest.raises(ConnectRefused):
        connect(port, fleet.product_key, name, fleet.secrets[name])


def test_a_second_connection_of_a_device_replaces_the_first(fleet):
    name = fleet.register()
    first = fleet.connect(name)
    eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
    first.client.reconnect_delay_set(60, 120)  # do not come back on its own
    second = fleet.connect(name)
    assert first.disconnected.wait(10)
    time.sleep(0.5)
    assert fleet.detail(name)["Status"] == "ONLINE"  # the older one's disconnect does not count
    second.inform("3.3.3")
    eventually(lambda: fleet.detail(name).get("FirmwareVersion") == "3.3.3")


def test_a_deleted_device_is_disconnected_at_once(fleet, server, local):
    """Its connection outlived the row: on SQLite the next device registered (of any account)
    took the deleted row's id, and the old connection then acted as that device: it was pushed
    the other account's package and drove its task (found by an audit)."""
    name = fleet.register()
    device = fleet.connect(name)
    eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
    device.client.reconnect_delay_set(60, 120)  # do not come back on its own
    deleted = fleet.api.call("DeleteDevice", {"ProductKey": fleet.product_key, "DeviceName": name})
    assert deleted["Success"], deleted
    assert device.disconnected.wait(10)
    other = Fleet(server, SdkCaller("tea-v3", server.endpoint, *server.create_key("device-channel-other")),
                  fleet.opened)
    newcomer = other.register()  # may take the deleted row's id
    with pytest.raises(ConnectRefused):
        connect(server.mqtt_port, fleet.product_key, name, fleet.secrets[name])
    assert other.detail(newcomer)["Status"] == "UNACTIVE"  # nothing acted as it


def test_a_device_deleted_by_another_process_is_let_go_at_its_next_message(make_server):
    """Before this server's heartbeat notices (5 minutes here), the device's next message hits the
    missing row: that connection is closed then (it was an error with a traceback each time)."""
    server = make_server("sqlite", "--rate-limit", "0", env={"OTAPLANE_CHANNEL_HEARTBEAT_SECONDS": "300"})
    api = SdkCaller("tea-v3", server.endpoint, *server.create_key("gone-at-next-message"))
    fleet = Fleet(server, api, [])
    name = fleet.register()
    device = fleet.connect(name)
    try:
        eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
        device.client.reconnect_delay_set(60, 120)
        other = Services.build(Settings(data_dir=server.data_dir, database_url=server.database_url))
        try:
            tenant = other.accounts.tenant_by_name("gone-at-next-message")
            other.devices.delete(tenant, DeviceRef(product_key=fleet.product_key, device_name=name))
        finally:
            other.close()
        device.inform("9.9.9")
        assert device.disconnected.wait(10)
        assert "Traceback" not in server.logs()
    finally:
        device.close()


def test_get_device_status_says_when_the_status_changed(fleet):
    """Its Timestamp moved with every message the device sent (found by an audit); the platform's
    is "the time when the device status changed": the connect."""
    from datetime import datetime

    name = fleet.register()
    device = fleet.connect(name)
    eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
    time.sleep(1.2)
    device.inform("4.4.4")
    eventually(lambda: fleet.detail(name).get("FirmwareVersion") == "4.4.4")
    online_ms = int(datetime.fromisoformat(fleet.detail(name)["UtcOnline"].replace("Z", "+00:00")).timestamp() * 1000)
    status = fleet.api.call("GetDeviceStatus", {"ProductKey": fleet.product_key, "DeviceName": name})["Data"]
    assert (status["Status"], status["Timestamp"]) == ("ONLINE", online_ms)


def test_a_device_deleted_by_another_process_is_disconnected_within_a_heartbeat(fleet, local, tenant):
    """Another process (the CLI, another server on the database) deletes it: this server's next
    heartbeat (10 s) finds the row gone and closes the connection."""
    name = fleet.register()
    device = fleet.connect(name)
    eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
    device.client.reconnect_delay_set(60, 120)
    other_tenant = local.accounts.tenant_by_name(ACCOUNT)
    local.devices.delete(other_tenant, DeviceRef(product_key=fleet.product_key, device_name=name))
    assert device.disconnected.wait(25)


def test_a_silent_connection_is_closed_after_one_and_a_half_keepalives(fleet):
    name = fleet.register()
    client_id = f"{fleet.product_key}&{name}"
    password = device_password(fleet.secrets[name], client_id, name, fleet.product_key, None, "hmacsha1")
    sock, connack = raw_connect(fleet.server.mqtt_port, client_id + "|signmethod=hmacsha1|",
                                f"{name}&{fleet.product_key}", password, keepalive=1)
    with sock:
        assert connack == b"\x20\x02\x00\x00"
        eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
        started = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(10) == b""  # the server closed it
        assert time.monotonic() - started < 5
    eventually(lambda: fleet.detail(name)["Status"] == "OFFLINE")


def test_a_connection_without_connect_is_closed(make_server):
    server = make_server("sqlite", env={"OTAPLANE_MQTT_CONNECT_TIMEOUT_SECONDS": "1"})
    with socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - started < 5


def test_serve_says_in_one_line_when_the_mqtt_port_is_taken(tmp_path):
    """Another broker on the MQTT port: a clear message and exit 1, not the broker's traceback."""
    from tests.support.server import free_port, otaplane_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mqtt_port = taken.getsockname()[1]
        result = otaplane_cli("serve", "--port", str(free_port()), "--mqtt-port", str(mqtt_port),
                              env={"OTAPLANE_DATA_DIR": str(tmp_path)}, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"the MQTT port 127.0.0.1:{mqtt_port} is not free" in " ".join(output.split()), output
    assert "Traceback" not in output


def test_serve_says_in_one_line_when_the_http_port_is_taken(tmp_path):
    """Another server on the HTTP port: uvicorn said so only after the MQTT broker had started
    (found by a CLI audit); now one line before anything starts, and exit 1."""
    from tests.support.server import free_port, otaplane_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = otaplane_cli("serve", "--port", str(port), "--mqtt-port", str(free_port()),
                              env={"OTAPLANE_DATA_DIR": str(tmp_path)}, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"the HTTP port 127.0.0.1:{port} is not free" in " ".join(output.split()), output
    assert "Traceback" not in output


# --- upstream: versions, progress, firmware/get -------------------------------------------------
def test_version_reports_show_in_the_openapi(fleet):
    name = fleet.register()
    device = fleet.connect(name)
    device.inform("1.0.0")
    eventually(lambda: fleet.detail(name).get("FirmwareVersion") == "1.0.0")
    device.inform("0.9.1", module="MCU", request_id="42")  # string id, a non-default module
    eventually(lambda: fleet.module_versions(name) == {"default": "1.0.0", "MCU": "0.9.1"})
    # LSDK4 style: numeric id, QoS 0, explicit default module, a trailing comma
    device.publish(f"/ota/device/inform/{fleet.product_key}/{name}",
                   b'{"id":1,"params":{"version":"1.0.1","module":"default",},}', qos=0)
    eventually(lambda: fleet.detail(name).get("FirmwareVersion") == "1.0.1")


def test_module_names_per_device_are_capped_and_known_ones_still_update(fleet):
    """Each new module name a device reports was a new device_modules row, without end."""
    name = fleet.register()
    device = fleet.connect(name)
    logged_before = len(fleet.server.logs())
    kept = ["default"] + [f"m{i}" for i in range(MAX_MODULES_PER_DEVICE - 1)]
    for module in kept:
        device.inform("1.0.0", module=module)
    for i in range(5):  # over the cap: refused, one warning for all of them
        device.inform("1.0.0", module=f"extra{i}")
    device.inform("2.0.0", module="m0")  # a module it has: still updated
    device.inform("2.0.0")
    eventually(lambda: fleet.module_versions(name) == {m: "2.0.0" if m in ("default", "m0") else "1.0.0"
                                                       for m in kept})
    assert fleet.detail(name)["FirmwareVersion"] == "2.0.0"
    logs = fleet.server.logs()[logged_before:]
    warnings = [line for line in logs.splitlines() if f"{fleet.product_key}/{name}" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0] and "'extra0'" in warnings[0], logs
    assert "Traceback" not in logs


@pytest.mark.parametrize("module", ["m" * 65, "MCU v2", "模块", "MCU\tx", "../etc"])
def test_a_module_name_outside_the_platforms_rule_is_refused(fleet, module):
    """1-64 of [A-Za-z0-9._-], as CreateOTAModule takes them: such a name can name no module (a
    name over 64 characters also would not fit the column)."""
    name = fleet.register()
    device = fleet.connect(name)
    logged_before = len(fleet.server.logs())
    device.inform("1.0.0", module=module)
    device.inform("1.0.1", module="MCU")
    eventually(lambda: fleet.module_versions(name) == {"MCU": "1.0.1"})
    logs = fleet.server.logs()[logged_before:]
    assert "dropped inform message" in logs and "Traceback" not in logs, logs


def test_firmware_get_answers_empty_data_when_nothing_is_pending(fleet):
    name = fleet.register()
    device = fleet.connect(name)
    device.firmware_get(request_id="123")
    assert device.expect(device.get_reply_topic).json() == {
        "id": "123", "code": 200, "data": {}, "message": "success", "method": "thing.ota.firmware.get"}
    device.firmware_get(request_id=9, module="MCU")
    assert device.expect(device.get_reply_topic).json()["id"] == 9


def _legacy_answer(device, topic: str) -> dict:
    """The next answer on iotkit's request topic: the device's own request comes back to it there
    too (it is subscribed to the topic it publishes on) and has no `code`."""
    while True:
        body = device.expect(topic).json()
        if "code" in body:
            return body


def test_legacy_request_is_answered_on_its_own_topic(fleet, local, tenant):
    # iotkit-embedded 2.x/3.x: subscribe to /ota/device/request/{pk}/{dn}, publish the request there.
    content = os.urandom(5_000)
    name = fleet.register()
    device = fleet.connect(name)
    topic = f"/ota/device/request/{fleet.product_key}/{name}"
    assert device.subscribe(topic) == [1]
    device.publish(topic, {"id": 11, "params": {"version": "1.0.0"}})
    assert _legacy_answer(device, topic) == {"code": "1000", "data": {}, "id": 11, "message": "success"}

    pushed = push(local, tenant, fleet, name, fleet.firmware(content))
    device.publish(topic, {"id": 12, "params": {"version": "1.0.0"}})
    answer = _legacy_answer(device, topic)
    # What IOTKIT3's ota_callback needs: "message":"success", version, url, a 32-character md5, size.
    assert answer["message"] == "success" and answer["code"] == "1000" and answer["id"] == pushed.message_id
    data = answer["data"]
    assert data["version"] == "2.0.0" and data["size"] == len(content)
    assert data["md5"] == hashlib.md5(content).hexdigest()
    assert httpx.get(data["url"], timeout=30).content == content
    assert _answers_within(device, topic, 1.5) == []  # one answer per request


def _answers_within(device, topic: str, seconds: float) -> list[dict]:
    """Every answer (a message with `code`) on `topic` for `seconds`; requests are skipped."""
    answers = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            body = device.expect(topic, timeout=left).json()
        except AssertionError:
            break
        if "code" in body:
            answers.append(body)
    return answers


# --- downstream: pushes ------------------------------------------------------------------------
def test_push_reaches_an_online_device_with_every_field_and_a_working_url(fleet, local, tenant):
    content = os.urandom(200_000)
    firmware_id = fleet.firmware(content)
    name = fleet.register()
    device = fleet.connect(name)
    device.inform("1.0.0")
    pushed = push(local, tenant, fleet, name, firmware_id)

    message = device.expect(device.upgrade_topic)
    body = message.json()
    assert message.qos == 1
    assert body["code"] == "1000" and body["message"] == "success"
    assert body["id"] == pushed.message_id and isinstance(body["id"], int)
    data = body["data"]
    assert set(data) == {"size", "version", "url", "md5", "sign", "signMethod"}  # no module, isDiff, extData
    md5 = hashlib.md5(content).hexdigest()
    assert (data["size"], data["version"], data["signMethod"]) == (len(content), "2.0.0", "Md5")
    assert data["md5"] == data["sign"] == md5
    downloaded = httpx.get(data["url"], timeout=30)
    assert downloaded.status_code == 200
    assert hashlib.md5(downloaded.content).hexdigest() == md5
    assert (pushed.module_name, pushed.device_id) == ("default", device_id(local, fleet, name))

    # Delivered once: acknowledged pushes are not sent again on this connection.
    device.expect_nothing(device.upgrade_topic, within=2.5)


def test_push_of_a_sha256_diff_package_in_a_module_with_udi(fleet, local, tenant):
    assert fleet.api.call("CreateOTAModule", {"ProductKey": fleet.product_key, "ModuleName": "MCU"})["Success"]
    content = os.urandom(50_000)
    firmware_id = fleet.firmware(content, ModuleName="MCU", SignMethod="SHA256", Type=1, SrcVersion="1.0.0",
                                 Udi='{"ota":"udi"}')
    name = fleet.register()
    device = fleet.connect(name)
    push(local, tenant, fleet, name, firmware_id)
    data = device.expect(device.upgrade_topic).json()["data"]
    assert data["signMethod"] == "SHA256"
    assert data["sign"] == hashlib.sha256(content).hexdigest()
    assert data["md5"] == hashlib.md5(content).hexdigest()  # for iotkit 3, whatever the method
    assert data["module"] == "MCU" and data["isDiff"] == 1
    assert data["extData"] == {"_package_udi": '{"ota":"udi"}'}
    assert hashlib.sha256(httpx.get(data["url"], timeout=30).content).hexdigest() == data["sign"]


def test_push_of_a_multi_file_package(fleet, local, tenant):
    contents = [os.urandom(1000), os.urandom(3000)]
    files = [{"Name": f"part{i}", "Url": fleet.upload(c)} for i, c in enumerate(contents)]
    body = fleet.api.call("CreateOTAFirmware", {"ProductKey": fleet.product_key, "FirmwareName": unique("fw-"),
                                                "DestVersion": "2.0.0", "MultiFiles": files})
    assert body["Success"], body
    name = fleet.register()
    device = fleet.connect(name)
    push(local, tenant, fleet, name, body["Data"]["FirmwareId"])
    data = device.expect(device.upgrade_topic).json()["data"]
    assert data["size"] == 4000 and data["signMethod"] == "Md5" and "url" not in data
    assert [(f["fileName"], f["fileSize"]) for f in data["files"]] == [("part0", 1000), ("part1", 3000)]
    for item, content in zip(data["files"], contents):
        assert item["fileSign"] == hashlib.md5(content).hexdigest()
        assert httpx.get(item["fileUrl"], timeout=30).content == content


def test_push_to_an_offline_device_arrives_when_it_connects(fleet, local, tenant):
    content = b"offline firmware" * 100
    firmware_id = fleet.firmware(content)
    name = fleet.register()
    pushed = push(local, tenant, fleet, name, firmware_id)
    time.sleep(1.5)  # a poll or more passes while the device is away
    device = fleet.connect(name)
    body = device.expect(device.upgrade_topic).json()
    assert body["id"] == pushed.message_id and body["data"]["md5"] == hashlib.md5(content).hexdigest()


def test_a_pending_package_is_pushed_again_on_reconnect_until_installed(fleet, local, tenant):
    firmware_id = fleet.firmware(b"again" * 100)
    name = fleet.register()
    device = fleet.connect(name)
    pushed = push(local, tenant, fleet, name, firmware_id)
    assert device.expect(device.upgrade_topic).json()["id"] == pushed.message_id
    device.close()
    eventually(lambda: fleet.detail(name)["Status"] == "OFFLINE")
    device = fleet.connect(name)
    assert device.expect(device.upgrade_topic).json()["id"] == pushed.message_id
    device.inform("2.0.0")  # the DestVersion: done
    eventually(lambda: local.device_ota.offers(device_id(local, fleet, name)) == [])
    device.close()
    device = fleet.connect(name)
    device.expect_nothing(device.upgrade_topic, within=2)


def test_firmware_get_answers_the_pending_package(fleet, local, tenant):
    content = os.urandom(10_000)
    firmware_id = fleet.firmware(content)
    name = fleet.register()
    pushed = push(local, tenant, fleet, name, firmware_id)
    device = fleet.connect(name)
    device.expect(device.upgrade_topic)
    device.firmware_get(request_id="77")
    reply = device.expect(device.get_reply_topic).json()
    assert reply["id"] == "77" and reply["code"] == 200
    data = reply["data"]
    assert data["version"] == "2.0.0" and data["md5"] == hashlib.md5(content).hexdigest()
    assert data["sign"] == data["md5"] and data["signMethod"] == "Md5" and data["size"] == len(content)
    assert httpx.get(data["url"], timeout=30).content == content
    device.firmware_get(request_id="78", module="MCU")  # another module: nothing pending there
    assert device.expect(device.get_reply_topic).json()["data"] == {}
    assert pushed.module_name == "default"


def test_progress_is_recorded_and_a_failure_withdraws_the_offer(fleet, local, tenant):
    firmware_id = fleet.firmware(os.urandom(1000))
    name = fleet.register()
    device = fleet.connect(name)
    push(local, tenant, fleet, name, firmware_id)
    device.expect(device.upgrade_topic)
    the_id = device_id(local, fleet, name)

    device.progress(0)
    device.progress("50", desc="half way")
    eventually(lambda: (p := local.device_ota.offers(the_id)) and p[0].progress == 50 and p[0].progress_desc == "half way")
    device.progress(-2, desc="download failed")
    eventually(lambda: local.device_ota.offers(the_id) == [])
    device.firmware_get(request_id=1)
    assert device.expect(device.get_reply_topic).json()["data"] == {}

    # A new push starts over.
    pushed = push(local, tenant, fleet, name, firmware_id)
    assert device.expect(device.upgrade_topic).json()["id"] == pushed.message_id


def test_the_cli_pushes_through_the_running_server(fleet, server):
    firmware_id = fleet.firmware(b"cli firmware")
    name = fleet.register()
    device = fleet.connect(name)
    out = server.cli("devices", "push", "--product", fleet.product_key, "--device", name, "--firmware",
                     firmware_id, "--account", ACCOUNT, "--json")
    pushed = json.loads(out.stdout)
    assert device.expect(device.upgrade_topic).json()["id"] == pushed["MessageId"]
    refused = server.cli("devices", "push", "--product", fleet.product_key, "--device", name, "--firmware",
                         firmware_id, "--account", "someone-else", check=False)
    assert refused.returncode == 1


def test_the_cli_push_refuses_to_orphan_a_job_task_unless_forced(fleet, server, api):
    """`otaplane devices push` replaced the push of the device's running job task: the task stayed
    IN_PROGRESS for good and blocked the device's later jobs (found by an audit)."""
    job_package = fleet.firmware(b"job firmware", NeedToVerify=False)
    cli_package = fleet.firmware(b"cli firmware", DestVersion="3.0.0")
    name = fleet.register()
    device = fleet.connect(name)
    device.inform("1.0.0")
    eventually(lambda: fleet.module_versions(name).get("default") == "1.0.0")
    job_id = api.call("CreateOTAStaticUpgradeJob", {
        "ProductKey": fleet.product_key, "FirmwareId": job_package, "TargetSelection": "SPECIFIC",
        "TargetDeviceName": [name]})["Data"]["JobId"]
    device.expect(device.upgrade_topic)
    device.progress(10)

    def task() -> dict:
        return api.call("ListOTATaskByJob", {"JobId": job_id, "CurrentPage": 1, "PageSize": 10})["Data"][
            "SimpleOTATaskInfo"][0]

    eventually(lambda: task()["TaskStatus"] == "IN_PROGRESS")
    command = ("devices", "push", "--product", fleet.product_key, "--device", name, "--firmware", cli_package,
               "--account", ACCOUNT)
    refused = server.cli(*command, check=False)
    assert refused.returncode == 1
    assert task()["TaskId"] in refused.stdout and job_id in refused.stdout and "--force" in refused.stdout
    device.expect_nothing(device.upgrade_topic)
    assert task()["TaskStatus"] == "IN_PROGRESS"

    pushed = json.loads(server.cli(*command, "--force", "--json").stdout)
    assert device.expect(device.upgrade_topic).json()["id"] == pushed["MessageId"]
    assert (task()["TaskStatus"], task()["TaskDesc"]) == ("CANCELED", "replaced by a push from the CLI")


def test_push_refuses_another_products_package_and_unknown_ids(fleet, local, tenant, api):
    other = Fleet(fleet.server, api, fleet.opened)
    firmware_id = other.firmware(b"other product")
    name = fleet.register()
    from otaplane.errors import ApiError

    for device_name, package, code in ((name, firmware_id, "iot.ota.FirmwareProductMismatch"),
                                       ("no-such-device", firmware_id, "iot.device.NotExistedDevice"),
                                       (name, "no-such-firmware", "iot.ota.FirmwareNotFound")):
        with pytest.raises(ApiError) as refused:
            push(local, tenant, fleet, device_name, package)
        assert refused.value.code == code


def test_a_burst_of_devices_connects_at_once_and_each_gets_its_push(fleet, local):
    from concurrent.futures import ThreadPoolExecutor

    names = [fleet.register() for _ in range(40)]
    with ThreadPoolExecutor(len(names)) as pool:  # CONNECTs arriving together share lookups and writes
        connected = list(pool.map(lambda name: connect(fleet.server.mqtt_port, fleet.product_key, name,
                                                       fleet.secrets[name]), names))
    fleet.opened.extend(connected)
    ids = [device_id(local, fleet, name) for name in names]
    eventually(lambda: all(fleet.detail(name)["Status"] == "ONLINE" for name in names))

    content = b"fleet firmware"
    firmware_id = fleet.firmware(content)
    with local.db.connect() as conn:
        from otaplane.store import device_ota as pending_store

        firmware_pk = pending_store.firmware_row(conn, None, firmware_id)["id"]
    pushed = local.device_ota.push_many(firmware_pk, ids)
    for device, item in zip(connected, pushed):
        assert device.expect(device.upgrade_topic).json()["id"] == item.message_id


def test_push_many_is_all_or_nothing(fleet, local, api):
    other = Fleet(fleet.server, api, fleet.opened)
    firmware_id = fleet.firmware(b"mine")
    mine, theirs = fleet.register(), other.register()
    with local.db.connect() as conn:
        from otaplane.store import device_ota as pending_store

        firmware_pk = pending_store.firmware_row(conn, None, firmware_id)["id"]
    from otaplane.errors import ApiError

    with pytest.raises(ApiError) as refused:
        local.device_ota.push_many(firmware_pk, [device_id(local, fleet, mine), device_id(local, other, theirs)])
    assert refused.value.code == "iot.ota.FirmwareProductMismatch"
    assert local.device_ota.offers(device_id(local, fleet, mine)) == []


# --- robustness and isolation -------------------------------------------------------------------
def test_malformed_and_oversize_messages_are_dropped_without_harm_to_others(fleet):
    bad_name, good_name = fleet.register(), fleet.register()
    bad, good = fleet.connect(bad_name), fleet.connect(good_name)
    pk = fleet.product_key
    for topic in (f"/ota/device/inform/{pk}/{bad_name}", f"/ota/device/progress/{pk}/{bad_name}",
                  f"/sys/{pk}/{bad_name}/thing/ota/firmware/get"):
        for payload in (b"not json", b"\xff\xfe\x00", b"[]", b'{"id": {}, "params": 1}', b"",
                        b'{"params": {"version": 12, "step": "lots"}}', json.dumps({"id": 1, "params": {
                            "version": "v" * 300}}).encode()):
            bad.publish(topic, payload)
    bad.publish(f"/sys/{pk}/{bad_name}/thing/event/property/post", b'{"whatever": true}')

    good.inform("1.2.3")
    eventually(lambda: fleet.detail(good_name).get("FirmwareVersion") == "1.2.3")
    assert "FirmwareVersion" not in fleet.detail(bad_name)

    bad.client.reconnect_delay_set(60, 120)
    bad.publish(f"/ota/device/inform/{pk}/{bad_name}", b"{" + b" " * (65 * 1024) + b"}", qos=0)
    assert bad.disconnected.wait(10), "an oversize PUBLISH closes the connection"
    good.firmware_get(request_id="still-here")
    assert good.expect(good.get_reply_topic).json()["id"] == "still-here"


def _raw_device(fleet: Fleet, name: str) -> socket.socket:
    """A device connected on a bare socket (to send what paho refuses to)."""
    client_id = f"{fleet.product_key}&{name}"
    password = device_password(fleet.secrets[name], client_id, name, fleet.product_key, None, "hmacsha1")
    sock, connack = raw_connect(fleet.server.mqtt_port, client_id + "|signmethod=hmacsha1|",
                                f"{name}&{fleet.product_key}", password, keepalive=60)
    assert connack == b"\x20\x02\x00\x00"
    return sock


def _closed_by_server(sock: socket.socket, within: float = 5) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("wildcard, qos", [("+", 1), ("#", 0)])
def test_a_publish_to_a_wildcard_topic_closes_the_connection_and_no_other(fleet, wildcard, qos):
    """[MQTT-3.3.2-2]: a topic name holds no wildcard, and the server closes the connection of a
    client that sends one. amqtt 0.12 raised in the middle of the packet and read its payload as
    the next packets: here that payload is a well-formed version report, which must not land."""
    bad_name, good_name = fleet.register(), fleet.register()
    good = fleet.connect(good_name)
    pk = fleet.product_key
    logged_before = len(fleet.server.logs())
    smuggled = mqtt_codec.publish_packet(f"/ota/device/inform/{pk}/{bad_name}",
                                         b'{"id":1,"params":{"version":"6.6.6"}}', qos=0)
    with _raw_device(fleet, bad_name) as sock:
        eventually(lambda: fleet.detail(bad_name)["Status"] == "ONLINE")
        sock.sendall(mqtt_codec.publish_packet(f"/ota/device/inform/{pk}/{wildcard}", smuggled, qos=qos, packet_id=7))
        assert _closed_by_server(sock), "the connection stays open after a wildcard PUBLISH"
    eventually(lambda: fleet.detail(bad_name)["Status"] == "OFFLINE")
    assert "FirmwareVersion" not in fleet.detail(bad_name)

    good.inform("1.2.3")  # the others are served as before
    eventually(lambda: fleet.detail(good_name).get("FirmwareVersion") == "1.2.3")
    logs = fleet.server.logs()[logged_before:]
    warnings = [line for line in logs.splitlines() if "MQTT-3.3.2-2" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0] and f"inform/{pk}/{wildcard}" in warnings[0], logs
    assert "Traceback" not in logs


def test_a_device_cannot_read_or_write_another_devices_ota_topics(fleet, local, tenant):
    firmware_id = fleet.firmware(b"victim firmware")
    victim_name, thief_name = fleet.register(), fleet.register()
    victim = fleet.connect(victim_name)
    thief = fleet.connect(thief_name)
    pk = fleet.product_key

    refused = [thief.subscribe(f"/ota/device/upgrade/{pk}/{victim_name}"),
               thief.subscribe(f"/sys/{pk}/{victim_name}/thing/ota/firmware/get_reply"),
               thief.subscribe("/ota/device/#"), thief.subscribe("#")]
    assert all(codes[0].is_failure for codes in refused), refused
    assert not thief.subscribe(f"/sys/{pk}/{thief_name}/#")[0].is_failure  # its own: granted

    victim.inform("1.0.0")
    eventually(lambda: fleet.detail(victim_name).get("FirmwareVersion") == "1.0.0")
    push(local, tenant, fleet, victim_name, firmware_id)
    victim.expect(victim.upgrade_topic)
    thief.expect_nothing(victim.upgrade_topic, within=2)

    # Writing the victim's topics changes nothing of the victim.
    thief.publish(f"/ota/device/inform/{pk}/{victim_name}", {"id": 1, "params": {"version": "6.6.6"}})
    thief.publish(f"/ota/device/progress/{pk}/{victim_name}", {"id": 1, "params": {"step": "-1"}})
    thief.publish(f"/sys/{pk}/{victim_name}/thing/ota/firmware/get", {"id": "steal", "params": {}})
    thief.expect_nothing(victim.get_reply_topic, within=1.5)
    victim.expect_nothing(victim.get_reply_topic, within=0.1)
    time.sleep(0.5)
    assert fleet.detail(victim_name)["FirmwareVersion"] == "1.0.0"
    offers = local.device_ota.offers(device_id(local, fleet, victim_name))
    assert len(offers) == 1 and offers[0].progress is None
    assert "FirmwareVersion" not in fleet.detail(thief_name)


@pytest.mark.parametrize("pem", ["two files", "one file"])
def test_tls_listener(make_server, tmp_path, pem):
    certfile, keyfile = _self_signed(tmp_path)
    if pem == "two files":
        tls = ("--mqtt-certfile", str(certfile), "--mqtt-keyfile", str(keyfile))
    else:  # certificate and key in one PEM, no --mqtt-keyfile (it failed: "Is a directory")
        combined = tmp_path / "mqtt.pem"
        combined.write_bytes(certfile.read_bytes() + keyfile.read_bytes())
        tls = ("--mqtt-certfile", str(combined))
    server = make_server("sqlite", "--rate-limit", "0", *tls)
    api = SdkCaller("tea-v3", server.endpoint, *server.create_key("tls-" + pem.replace(" ", "-")))
    fleet = Fleet(server, api, [])
    name = fleet.register()
    device = fleet.connect(name, tls=True, form="lsdk4", method="hmacsha256")
    try:
        eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
        device.firmware_get(request_id="tls")
        assert device.expect(device.get_reply_topic).json()["id"] == "tls"
    finally:
        device.close()
    with pytest.raises((ConnectRefused, TimeoutError, OSError)):  # plain MQTT on a TLS port
        connect(server.mqtt_port, fleet.product_key, name, fleet.secrets[name], timeout=3)


def _self_signed(folder):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "mqtt.crt", folder / "mqtt.key"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def test_stopping_the_server_marks_its_devices_offline(make_server):
    server = make_server("sqlite", "--rate-limit", "0")
    api = SdkCaller("tea-v3", server.endpoint, *server.create_key("stopping"))
    fleet = Fleet(server, api, [])
    names = [fleet.register() for _ in range(3)]
    connected = [fleet.connect(name) for name in names]
    for name in names:
        eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
    for device in connected:
        device.client.reconnect_delay_set(60, 120)
    server.stop()
    services = Services.build(Settings(data_dir=server.data_dir))
    try:
        tenant = services.accounts.tenant_by_name("stopping")
        for name in names:
            assert services.devices.get(tenant, DeviceRef(product_key=fleet.product_key,
                                                          device_name=name)).status == "OFFLINE"
    finally:
        services.close()
        for device in connected:
            device.close()
