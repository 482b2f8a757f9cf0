"""The simulated device's OTA behaviour, message by message (what it publishes for what it gets).
Only the MQTT client is replaced, by one that records; the end-to-end path is tests/e2e/test_sim.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from otaplane.sim.device import Behaviour, SimDevice
from otaplane.sim.stats import Stats

PK, DN = "a1PK", "sim-000001"


class RecordingClient:
    def __init__(self):
        self.sent: list[tuple[str, dict, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.sent.append((topic, json.loads(payload), qos))


def make(**behaviour) -> tuple[SimDevice, RecordingClient, Stats]:
    stats = Stats(devices=1)
    device = SimDevice(0, PK, DN, "secret", Behaviour(step_delay=0, download=False, **behaviour), stats, None, set())
    device.client = RecordingClient()
    return device, device.client, stats


def push(message_id: int = 11, version: str = "2.0.0", **data) -> bytes:
    body = {"code": "1000", "id": message_id, "message": "success",
            "data": {"size": 3, "version": version, "url": "http://x/fw", "md5": "0" * 32, "sign": "0" * 32,
                     "signMethod": "Md5", **data}}
    return json.dumps(body).encode()


def sent(client: RecordingClient) -> list[tuple[str, dict]]:
    """(kind, params) of each upstream message."""
    return [(topic.split("/")[3] if topic.startswith("/ota/") else "get", body["params"])
            for topic, body, _ in client.sent]


async def settle(device: SimDevice) -> None:
    while device.tasks:
        await asyncio.gather(*device.tasks)


def test_connect_reports_the_version_and_pulls_when_asked():
    device, client, _ = make(pull=True, module="MCU", version="1.2.3")
    device.on_connect()
    assert sent(client) == [("inform", {"version": "1.2.3", "module": "MCU"}), ("get", {"module": "MCU"})]
    assert [qos for _, _, qos in client.sent] == [1, 0]


def test_an_upgrade_reports_progress_then_the_new_version_and_runs_once_per_message_id():
    async def scenario():
        device, client, stats = make()
        device.on_message(device.topics["upgrade"], push(11))
        device.on_message(device.topics["upgrade"], push(11))  # while running
        await settle(device)
        device.on_message(device.topics["upgrade"], push(11))  # after: the same id again
        await settle(device)
        return device, client, stats

    device, client, stats = asyncio.run(scenario())
    assert sent(client) == [("progress", {"step": "0", "desc": ""}), ("progress", {"step": "50", "desc": ""}),
                            ("progress", {"step": "100", "desc": ""}), ("inform", {"version": "2.0.0"})]
    assert device.version == "2.0.0"
    assert (stats.pushes, stats.duplicates, stats.upgrades_started, stats.succeeded) == (3, 2, 1, 1)


def test_other_modules_empty_replies_and_the_installed_version_start_nothing():
    async def scenario():
        device, client, stats = make(version="2.0.0")
        device.on_message(device.topics["upgrade"], push(1, module="MCU"))
        device.on_message(device.topics["get_reply"], b'{"id":"1","code":200,"data":{}}')
        device.on_message(device.topics["upgrade"], push(2, version="2.0.0"))  # already there: inform again
        device.on_message("/some/other/topic", push(3))
        await settle(device)
        return client, stats

    client, stats = asyncio.run(scenario())
    assert sent(client) == [("inform", {"version": "2.0.0"})]
    assert stats.upgrades_started == 0


@pytest.mark.parametrize("step, before", [
    (-2, ["0"]), (-3, ["0"]), (-4, ["0", "50"]), (-1, ["0", "50"]),
])
def test_a_failing_upgrade_reports_its_step_at_its_stage_and_keeps_the_version(step, before):
    async def scenario():
        device, client, stats = make(fail_rate=1.0, fail_step=step)
        device.on_message(device.topics["upgrade"], push(5))
        await settle(device)
        return device, client, stats

    device, client, stats = asyncio.run(scenario())
    steps = [params["step"] for kind, params in sent(client)]
    assert steps == [*before, str(step)]
    assert all(kind == "progress" for kind, _ in sent(client))
    assert device.version == "1.0.0" and (stats.failed, stats.succeeded) == (1, 0)
