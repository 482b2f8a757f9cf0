"""`otaplane sim` end to end: a real server process, the simulator as a subprocess of the CLI,
pushes made through DeviceOtaService against the server's database (as `otaplane devices push`
does), results checked through the OpenAPI and the simulator's stats file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from otaplane.services.container import Services
from otaplane.services.devices import DeviceRef
from otaplane.settings import Settings
from tests.support.clients import SdkCaller
from tests.support import waiting
from tests.support.uploads import post_upload


def eventually(check, timeout: float = 20, interval: float = 0.2):
    """The shared poll, tolerant of a stats file read while the simulator writes it."""
    return waiting.eventually(check, timeout, interval, retry_on=(AssertionError, OSError, ValueError))


ACCOUNT = "sim-tests"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"




@pytest.fixture(scope="module")
def key(server) -> tuple[str, str]:
    return server.create_key(ACCOUNT)


@pytest.fixture(scope="module")
def api(server, key) -> SdkCaller:
    return SdkCaller("tea-v3", server.endpoint, *key)


@pytest.fixture(scope="module")
def local(server):
    services = Services.build(Settings(data_dir=server.data_dir, database_url=server.database_url))
    yield services
    services.close()


@pytest.fixture(scope="module")
def tenant(local, api):
    return local.accounts.tenant_by_name(ACCOUNT)


class Sim:
    """`otaplane sim` running in a subprocess, with its stats file."""

    def __init__(self, server, key, product_key: str, devices: int, tmp: Path, *args: str):
        self.stats_path = tmp / f"stats-{uuid.uuid4().hex[:6]}.json"
        self.devices = devices
        command = [sys.executable, "-m", "otaplane", "sim", "--devices", str(devices), "--product", product_key,
                   "--endpoint", server.base_url, "--access-key-id", key[0], "--access-key-secret", key[1],
                   "--mqtt-host", "127.0.0.1", "--mqtt-port", str(server.mqtt_port), "--stats-file",
                   str(self.stats_path), "--step-delay", "0.05", "--duration", "40", "--per-device", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **server.env})

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def wait_connected(self) -> dict:
        def check():
            assert self.process.poll() is None, self.process.communicate()[0]
            stats = self.stats()
            return stats if stats["connected"] == self.devices else None

        return eventually(check, timeout=30)

    def wait(self, condition, timeout: float = 20) -> dict:
        def check():
            stats = self.stats()
            return stats if condition(stats) else None

        return eventually(check, timeout)

    def stop(self) -> tuple[dict, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, output
        return self.stats(), output

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture()
def sims(server, key, tmp_path):
    started: list[Sim] = []

    def start(product_key: str, devices: int, *args: str) -> Sim:
        sim = Sim(server, key, product_key, devices, tmp_path, *args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.kill()


def product(api) -> str:
    body = api.call("CreateProduct", {"ProductName": unique("sim_"), "NodeType": 0})
    assert body["Success"], body
    return body["ProductKey"]


def firmware(api, product_key: str, content: bytes, version: str = "2.0.0", **extra) -> str:
    generated = api.call("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
    assert post_upload(generated, content).status_code in (200, 204)
    body = api.call("CreateOTAFirmware", {"ProductKey": product_key, "FirmwareName": unique("fw-"),
                                          "DestVersion": version, "FirmwareUrl": generated["FirmwareUrl"], **extra})
    assert body["Success"], body
    return body["Data"]["FirmwareId"]


def push_all(local, tenant, product_key: str, names: list[str], firmware_id: str) -> None:
    for name in names:
        local.device_ota.push(tenant, DeviceRef(product_key=product_key, device_name=name), firmware_id)


def version_of(api, product_key: str, name: str) -> str | None:
    body = api.call("QueryDeviceDetail", {"ProductKey": product_key, "DeviceName": name})
    return body["Data"].get("FirmwareVersion")


def offers_of(local, product_key: str, name: str) -> list:
    return local.device_ota.offers(local.devices.credentials(product_key, name).device_id)


NAMES20 = [f"sim-{i:06d}" for i in range(1, 21)]


def test_twenty_devices_upgrade_and_report_the_new_version(api, local, tenant, sims):
    product_key = product(api)
    content = os.urandom(300_000)
    firmware_id = firmware(api, product_key, content, SignMethod="SHA256")
    sim = sims(product_key, 20)
    connected = sim.wait_connected()
    assert connected["versions"] == {"1.0.0": 20}
    eventually(lambda: all(version_of(api, product_key, n) == "1.0.0" for n in NAMES20[:3]))

    push_all(local, tenant, product_key, NAMES20, firmware_id)
    sim.wait(lambda s: s["succeeded"] == 20)
    stats, output = sim.stop()
    assert "0 devices reused, 20 to register" in output
    assert (stats["succeeded"], stats["failed"], stats["downloads"]) == (20, 0, 20)
    assert stats["pushes"] >= 20 and stats["download_bytes"] == 20 * len(content)
    assert stats["checksum_mismatches"] == 0 and stats["connect_refused"] == 0
    assert stats["versions"] == {"2.0.0": 20}
    assert set(stats["per_device"]) == set(NAMES20)
    # the server saw the new version: the device runs it and nothing is pending any more
    eventually(lambda: all(version_of(api, product_key, n) == "2.0.0" for n in NAMES20))
    eventually(lambda: all(offers_of(local, product_key, n) == [] for n in NAMES20))

    # A second run reuses the 20 devices (and registers only what is missing).
    sim = sims(product_key, 22, "--quiet")
    sim.wait_connected()
    stats, output = sim.stop()
    assert output.strip() == ""
    assert stats["ever_connected"] == 22 and stats["pushes"] == 0
    names = {d["DeviceName"] for d in api.call("QueryDevice", {"ProductKey": product_key, "PageSize": 50})
             ["Data"]["DeviceInfo"]}
    assert names == set(NAMES20) | {"sim-000021", "sim-000022"}


def test_fail_rate_one_reports_failures_and_keeps_the_old_version(api, local, tenant, sims):
    product_key = product(api)
    firmware_id = firmware(api, product_key, os.urandom(2000))
    names = NAMES20[:10]
    sim = sims(product_key, 10, "--fail-rate", "1", "--fail-step", "-4", "--version", "1.5.0")
    sim.wait_connected()
    push_all(local, tenant, product_key, names, firmware_id)
    stats = sim.wait(lambda s: s["failed"] == 10)
    # a failure withdraws the server's offer: nothing is pushed again
    eventually(lambda: all(offers_of(local, product_key, n) == [] for n in names))
    time.sleep(0.5)
    stats, _ = sim.stop()
    assert (stats["succeeded"], stats["failed"], stats["upgrades_started"]) == (0, 10, 10)
    assert stats["versions"] == {"1.5.0": 10}
    assert all(version_of(api, product_key, n) == "1.5.0" for n in names)


def test_a_job_with_download_protocol_mqtt_upgrades_the_fleet_over_mqtt(api, sims):
    """The simulated devices read the package in 5 KB blocks over MQTT, as link-sdk-c 4.x does."""
    product_key = product(api)
    content = os.urandom(23_456)  # four full blocks and a short one
    firmware_id = firmware(api, product_key, content, SignMethod="SHA256", NeedToVerify=False)
    sim = sims(product_key, 5)
    sim.wait_connected()
    body = api.call("CreateOTAStaticUpgradeJob", {"ProductKey": product_key, "FirmwareId": firmware_id,
                                                  "TargetSelection": "ALL", "DownloadProtocol": "MQTT"})
    assert body["Success"], body
    sim.wait(lambda s: s["succeeded"] == 5)
    stats, _ = sim.stop()
    assert (stats["succeeded"], stats["failed"], stats["checksum_mismatches"]) == (5, 0, 0)
    assert stats["download_bytes"] == 5 * len(content)
    assert stats["versions"] == {"2.0.0": 5}
    eventually(lambda: all(version_of(api, product_key, n) == "2.0.0" for n in NAMES20[:5]))


def test_pull_after_connect_gets_a_package_pushed_while_offline(api, local, tenant, sims):
    product_key = product(api)
    content = os.urandom(5000)
    firmware_id = firmware(api, product_key, content)
    # devices registered beforehand (the simulator reuses them), the push made while they are away
    names = NAMES20[:3]
    for name in names:
        assert api.call("RegisterDevice", {"ProductKey": product_key, "DeviceName": name})["Success"]
    push_all(local, tenant, product_key, names, firmware_id)
    sim = sims(product_key, 3, "--pull")
    stats = sim.wait(lambda s: s["succeeded"] == 3)
    time.sleep(1.0)  # the push on connect and the get_reply both arrived: one upgrade each
    stats, output = sim.stop()
    assert "3 devices reused, 0 to register" in output
    assert (stats["succeeded"], stats["upgrades_started"], stats["failed"]) == (3, 3, 0)
    assert stats["pushes"] >= 3
    eventually(lambda: all(version_of(api, product_key, n) == "2.0.0" for n in names))


def test_a_checksum_mismatch_reports_verify_failed(api, local, tenant, sims, server):
    product_key = product(api)
    content = os.urandom(4096)
    firmware_id = firmware(api, product_key, content)
    # Corrupt the stored object behind the server's back (same size, other bytes).
    corrupted = 0
    for path in (Path(server.data_dir) / "blobs").rglob("*"):
        if path.is_file() and path.stat().st_size == len(content) and path.read_bytes() == content:
            path.write_bytes(bytes(b ^ 0xFF for b in content))
            corrupted += 1
    assert corrupted
    names = NAMES20[:3]
    sim = sims(product_key, 3)
    sim.wait_connected()
    push_all(local, tenant, product_key, names, firmware_id)
    sim.wait(lambda s: s["failed"] == 3)
    stats, _ = sim.stop()
    assert (stats["checksum_mismatches"], stats["downloads"], stats["succeeded"]) == (3, 3, 0)
    assert all(version_of(api, product_key, n) == "1.0.0" for n in names)


def test_a_device_kicked_off_by_another_connection_reconnects(api, sims, server):
    from tests.support.devices import connect

    product_key = product(api)
    sim = sims(product_key, 2)
    sim.wait_connected()
    info = api.call("QueryDeviceInfo", {"ProductKey": product_key, "DeviceName": "sim-000001"})["Data"]
    secret = info["DeviceSecret"]
    intruder = connect(server.mqtt_port, product_key, "sim-000001", secret)
    intruder.client.reconnect_delay_set(60, 120)  # it stays away once the simulated device takes over again
    try:
        stats = sim.wait(lambda s: s["disconnects"] >= 1 and s["connects"] >= 3 and s["connected"] == 2)
        assert intruder.disconnected.wait(10)
    finally:
        intruder.close()
    stats, _ = sim.stop()
    assert stats["connect_refused"] == 0 and stats["ever_connected"] == 2


def test_a_fleet_that_never_connects_fails_and_an_unwritable_stats_file_is_said_once(api, server, key, tmp_path):
    """Pointed at a port where no broker listens, `otaplane sim` ran its whole duration showing
    'connected 0/N' and exited 0; a --stats-file in a missing folder logged a warning every
    0.2 s (found by a CLI audit)."""
    import socket

    with socket.socket() as probe:  # a free port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        nowhere = probe.getsockname()[1]
    missing = tmp_path / "no-such-folder" / "stats.json"
    done = subprocess.run(
        [sys.executable, "-m", "otaplane", "sim", "--devices", "2", "--product", product(api),
         "--endpoint", server.base_url, "--access-key-id", key[0], "--access-key-secret", key[1],
         "--mqtt-host", "127.0.0.1", "--mqtt-port", str(nowhere), "--stats-file", str(missing),
         "--duration", "2", "--quiet"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **server.env})
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"No device could connect to the MQTT broker at 127.0.0.1:{nowhere}" in output
    assert output.count("cannot write") == 1, output
