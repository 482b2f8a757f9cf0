"""The real Python device SDK, aliyun-iot-linkkit 1.2.13, unmodified, against otaplane's device
channel: it connects with its own signature, reports its version, receives the push, downloads
and checks the package with its own code, reports progress, asks with firmware/get and reports
the new version."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from otaplane.services.container import Services
from otaplane.services.devices import DeviceRef
from otaplane.settings import Settings
from tests.e2e.test_device_channel import Fleet
from tests.support.clients import SdkCaller
from tests.support.linkkit_venv import Driver, linkkit_python
from tests.support.waiting import eventually

ACCOUNT = "linkkit-tests"


@pytest.fixture(scope="session")
def linkkit() -> os.PathLike:
    return linkkit_python()


@pytest.fixture(scope="module")
def api(server) -> SdkCaller:
    return SdkCaller("tea-v3", server.endpoint, *server.create_key(ACCOUNT))


@pytest.fixture(scope="module")
def local(server):
    services = Services.build(Settings(data_dir=server.data_dir, database_url=server.database_url))
    yield services
    services.close()


@pytest.mark.parametrize("sign_method, module, pushed", [
    ("MD5", "default", "while online"),
    ("SHA256", "MCU", "before it connects"),  # delivered right after CONNACK
])
def test_the_python_device_sdk_upgrades_end_to_end(server, api, local, linkkit, tmp_path, sign_method, module,
                                                   pushed):
    fleet = Fleet(server, api, [])
    if module != "default":
        assert api.call("CreateOTAModule", {"ProductKey": fleet.product_key, "ModuleName": module})["Success"]
    content = os.urandom(123_456)
    firmware_id = fleet.firmware(content, SignMethod=sign_method, ModuleName=module, DestVersion="2.1.0")
    name = fleet.register(f"lk-{uuid.uuid4().hex[:8]}")
    tenant = local.accounts.tenant_by_name(ACCOUNT)
    device = DeviceRef(product_key=fleet.product_key, device_name=name)
    if pushed == "before it connects":
        local.device_ota.push(tenant, device, firmware_id)

    driver = Driver(linkkit, {"host": "127.0.0.1", "port": server.mqtt_port, "product_key": fleet.product_key,
                              "device_name": name, "device_secret": fleet.secrets[name], "module": module,
                              "workdir": str(tmp_path)})
    try:
        assert driver.next_event() == {"event": "connected", "rc": 0}
        assert driver.next_event()["version"] == "1.0.0"
        eventually(lambda: fleet.detail(name)["Status"] == "ONLINE")
        eventually(lambda: fleet.module_versions(name).get(module) == "1.0.0")

        if pushed == "while online":
            local.device_ota.push(tenant, device, firmware_id)
        driver.proceed()

        push = driver.next_event()
        expected_sign = (hashlib.md5 if sign_method == "MD5" else hashlib.sha256)(content).hexdigest()
        assert push["event"] == "ota" and push["type"] == 1  # a push, on /ota/device/upgrade
        assert push["version"] == "2.1.0" and push["size"] == len(content) and push["module"] == module
        assert push["sign_method"] == ("Md5" if sign_method == "MD5" else "SHA256")
        assert push["sign"] == expected_sign

        downloaded = driver.next_event()
        assert downloaded["event"] == "downloaded"
        assert downloaded["ok"], downloaded  # the SDK's own sign check passed
        assert downloaded["size"] == len(content) and downloaded["md5"] == hashlib.md5(content).hexdigest()

        assert driver.next_event()["event"] == "progress"
        device_id = local.devices.credentials(fleet.product_key, name).device_id
        eventually(lambda: [p.progress for p in local.device_ota.offers(device_id)] == [100])

        answer = driver.next_event()
        assert answer["event"] == "ota" and answer["type"] == 2  # the firmware/get reply
        assert (answer["version"], answer["sign"], answer["module"]) == ("2.1.0", expected_sign, module)

        assert driver.next_event() == {"event": "reported", "version": "2.1.0", "module": module}
        eventually(lambda: fleet.module_versions(name).get(module) == "2.1.0")
        eventually(lambda: local.device_ota.offers(device_id) == [])
        assert driver.next_event()["event"] == "done"
        eventually(lambda: fleet.detail(name)["Status"] == "OFFLINE")
    finally:
        driver.stop()


def test_a_verify_job_on_two_python_sdk_devices(server, api, linkkit, tmp_path):
    """CreateOTAVerifyJob with two unmodified linkkit devices: the dispatcher pushes, each device
    downloads, checks and reports its new version, and the package goes Status 0 -> 2 -> 1 with
    VerifyProgress 0 -> 50 -> 100."""
    fleet = Fleet(server, api, [])
    content = os.urandom(65_432)
    firmware_id = fleet.firmware(content, DestVersion="3.0.0")  # NeedToVerify defaults to true

    def firmware() -> dict:
        return api.call("QueryOTAFirmware", {"FirmwareId": firmware_id})["FirmwareInfo"]

    assert (firmware()["Status"], firmware()["VerifyProgress"]) == (0, 0)
    names = [fleet.register(f"lkv-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    drivers = []
    try:
        for name in names:
            workdir = tmp_path / name
            workdir.mkdir()
            driver = Driver(linkkit, {"host": "127.0.0.1", "port": server.mqtt_port,
                                      "product_key": fleet.product_key, "device_name": name,
                                      "device_secret": fleet.secrets[name], "module": "default",
                                      "workdir": str(workdir)})
            drivers.append(driver)
            assert driver.next_event() == {"event": "connected", "rc": 0}
            assert driver.next_event()["version"] == "1.0.0"
        for name in names:
            eventually(lambda name=name: fleet.module_versions(name).get("default") == "1.0.0")

        body = api.call("CreateOTAVerifyJob", {"ProductKey": fleet.product_key, "FirmwareId": firmware_id,
                                               "TargetDeviceName": names, "TimeoutInMinutes": 10})
        assert body["Success"], body
        job_id = body["Data"]["JobId"]
        assert (firmware()["Status"], firmware()["VerifyProgress"]) == (2, 0)

        def tasks() -> dict[str, str]:
            data = api.call("ListOTATaskByJob", {"JobId": job_id, "CurrentPage": 1, "PageSize": 10})["Data"]
            return {t["DeviceName"]: t["TaskStatus"] for t in data["SimpleOTATaskInfo"]}

        for index, (name, driver) in enumerate(zip(names, drivers)):
            driver.proceed()
            push = driver.next_event()
            assert push["event"] == "ota" and push["type"] == 1 and push["version"] == "3.0.0", push
            assert driver.next_event()["ok"]  # downloaded, and the SDK's own MD5 check passed
            assert driver.next_event()["event"] == "progress"
            eventually(lambda name=name: tasks()[name] == "IN_PROGRESS")
            assert driver.next_event()["type"] == 2  # the firmware/get answer
            assert driver.next_event() == {"event": "reported", "version": "3.0.0", "module": "default"}
            eventually(lambda name=name: tasks()[name] == "SUCCEEDED")
            expected = (2, 50) if index == 0 else (1, 100)
            eventually(lambda expected=expected: (firmware()["Status"], firmware()["VerifyProgress"]) == expected)
        eventually(lambda: api.call("QueryOTAJob", {"JobId": job_id})["Data"]["JobStatus"] == "COMPLETED")
        job = api.call("QueryOTAJob", {"JobId": job_id})["Data"]
        assert job["JobType"] == "VERFIY_FIRMWARE" and job["TimeoutInMinutes"] == 10
    finally:
        for driver in drivers:
            driver.stop()
