"""Rollouts over a simulated fleet (`otaplane sim`, real MQTT, real HTTP downloads), driven
through the official SDK: a static GRAY job, a dynamic job that follows devices as they reach a
version, and a server killed with SIGKILL in the middle of a paced rollout."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from otaplane.settings import Settings
from tests.e2e.test_sim import Sim, eventually, firmware, product
from tests.support.clients import SdkCaller

ACCOUNT = "rollout-tests"


@pytest.fixture(scope="module")
def key(server) -> tuple[str, str]:
    return server.create_key(ACCOUNT)


@pytest.fixture(scope="module")
def api(server, key) -> SdkCaller:
    return SdkCaller("tea-v3", server.endpoint, *key)


def tasks_of(api, job_id: str) -> dict[str, dict]:
    tasks: dict[str, dict] = {}
    page = 1
    while True:
        data = api.call("ListOTATaskByJob", {"JobId": job_id, "CurrentPage": page, "PageSize": 100})
        assert data["Success"], data
        items = data["Data"]["SimpleOTATaskInfo"]
        tasks.update({t["DeviceName"]: t for t in items})
        if page >= data["PageCount"]:
            return tasks
        page += 1


def job_status(api, job_id: str) -> str:
    return api.call("QueryOTAJob", {"JobId": job_id})["Data"]["JobStatus"]


def test_gray_then_static_then_dynamic(server, api, key, tmp_path):
    """20 devices on 1.0.0. GRAY 25% to 2.0.0 takes 5 of them; a dynamic job for 3.0.0 from
    2.0.0 (DynamicMode 1) takes those 5 at once, and the other 15 as soon as a static job has
    brought them to 2.0.0: the whole fleet ends on 3.0.0."""
    product_key = product(api)
    v2 = firmware(api, product_key, os.urandom(3000), "2.0.0", NeedToVerify=False)
    v3 = firmware(api, product_key, os.urandom(5000), "3.0.0", NeedToVerify=False)
    sim = Sim(server, key, product_key, 20, tmp_path)
    try:
        sim.wait_connected()
        gray = api.call("CreateOTAStaticUpgradeJob", {"ProductKey": product_key, "FirmwareId": v2,
                                                      "TargetSelection": "GRAY", "GrayPercent": "25",
                                                      "SrcVersion": ["1.0.0"]})
        assert gray["Success"], gray
        gray_id = gray["Data"]["JobId"]
        eventually(lambda: job_status(api, gray_id) == "COMPLETED", timeout=30)
        gray_tasks = tasks_of(api, gray_id)
        assert len(gray_tasks) == 5
        assert {t["TaskStatus"] for t in gray_tasks.values()} == {"SUCCEEDED"}
        assert {t["Progress"] for t in gray_tasks.values()} == {"100.00"}
        assert {t["SrcVersion"] for t in gray_tasks.values()} == {"1.0.0"}

        dynamic = api.call("CreateOTADynamicUpgradeJob", {"ProductKey": product_key, "FirmwareId": v3,
                                                          "SrcVersion": ["2.0.0"], "DynamicMode": 1})
        assert dynamic["Success"], dynamic
        dynamic_id = dynamic["Data"]["JobId"]
        eventually(lambda: set(tasks_of(api, dynamic_id)) == set(gray_tasks), timeout=30)

        rest = api.call("CreateOTAStaticUpgradeJob", {"ProductKey": product_key, "FirmwareId": v2,
                                                      "TargetSelection": "ALL", "SrcVersion": ["1.0.0"]})
        assert rest["Success"], rest
        eventually(lambda: len(tasks_of(api, rest["Data"]["JobId"])) == 15)

        def all_on_3() -> bool:
            tasks = tasks_of(api, dynamic_id)
            return len(tasks) == 20 and {t["TaskStatus"] for t in tasks.values()} == {"SUCCEEDED"}

        eventually(all_on_3, timeout=60)
        assert sim.wait(lambda s: s["versions"] == {"3.0.0": 20})
        # The dispatcher reviews jobs once a second: the static job completes within that.
        eventually(lambda: job_status(api, rest["Data"]["JobId"]) == "COMPLETED", timeout=10)
        assert job_status(api, dynamic_id) == "IN_PROGRESS"  # until its strategy is cancelled
        assert api.call("CancelOTAStrategyByJob", {"JobId": dynamic_id})["Success"]
        assert job_status(api, dynamic_id) == "CANCELED"
        stats, _ = sim.stop()
        assert stats["duplicates"] == 0 and stats["failed"] == 0
        assert stats["succeeded"] == 5 + 15 + 20
    finally:
        sim.kill()


def test_failures_are_reported_per_task(server, api, key, tmp_path):
    product_key = product(api)
    v2 = firmware(api, product_key, os.urandom(2000), "2.0.0", NeedToVerify=False)
    sim = Sim(server, key, product_key, 4, tmp_path, "--fail-rate", "1", "--fail-step", "-3")
    try:
        sim.wait_connected()
        job = api.call("CreateOTAStaticUpgradeJob", {"ProductKey": product_key, "FirmwareId": v2,
                                                     "TargetSelection": "ALL"})
        job_id = job["Data"]["JobId"]
        eventually(lambda: job_status(api, job_id) == "COMPLETED", timeout=30)
        tasks = tasks_of(api, job_id)
        assert {t["TaskStatus"] for t in tasks.values()} == {"FAILED"}
        assert all("(step -3)" in t["TaskDesc"] for t in tasks.values()), tasks
    finally:
        sim.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
def restartable(request, make_server):
    if request.param == "postgresql" and not os.environ.get("OTAPLANE_TEST_POSTGRES_URL"):
        pytest.skip("set OTAPLANE_TEST_POSTGRES_URL to run on PostgreSQL")
    return make_server(request.param, "--rate-limit", "0")


def test_a_rollout_survives_kill_9(restartable, tmp_path):
    """A paced rollout (120/min) is killed with SIGKILL after some of its pushes went out. On
    restart it goes on from what the database says: every device ends on the new version, no task
    is lost, no attempt is dispatched twice, and no device got the same push twice."""
    server = restartable
    key = server.create_key(ACCOUNT)
    api = SdkCaller("tea-v3", server.endpoint, *key)
    product_key = product(api)
    v2 = firmware(api, product_key, os.urandom(4000), "2.0.0", NeedToVerify=False)
    sim = Sim(server, key, product_key, 24, tmp_path)
    engine = sa.create_engine(Settings(data_dir=server.data_dir, database_url=server.database_url)
                              .resolved_database_url())
    try:
        sim.wait_connected()
        job = api.call("CreateOTAStaticUpgradeJob", {"ProductKey": product_key, "FirmwareId": v2,
                                                     "TargetSelection": "ALL", "MaximumPerMinute": 120,
                                                     # a device downloading when the server dies fails
                                                     # its download (-2); its retry is a new attempt
                                                     "RetryCount": 1, "RetryInterval": 0})
        job_id = job["Data"]["JobId"]

        def dispatched() -> int:
            with engine.connect() as conn:
                return conn.execute(sa.text(
                    "SELECT count(*) FROM ota_tasks t JOIN ota_jobs j ON j.id = t.job_pk "
                    "WHERE j.job_id = :j AND t.message_id IS NOT NULL"), {"j": job_id}).scalar()

        def undelivered() -> int:
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM device_ota_pending WHERE delivered_ms IS NULL")
                                    ).scalar()

        # Between two pushes (they are 0.5 s apart): at-least-once delivery has one window no
        # server can close, a device's PUBACK not yet committed when the process dies (then
        # the same push goes again after the restart, and the device sees its id twice).
        eventually(lambda: dispatched() >= 8 and undelivered() == 0, timeout=30, interval=0.02)
        server.kill()
        with engine.connect() as conn:
            before = dict(conn.execute(sa.text(
                "SELECT t.task_id, t.message_id FROM ota_tasks t JOIN ota_jobs j ON j.id = t.job_pk "
                "WHERE j.job_id = :j AND t.message_id IS NOT NULL"), {"j": job_id}).all())
        assert 8 <= len(before) < 24  # killed mid-rollout
        server.start(keep_ports=True)  # the devices reconnect to the same ports

        eventually(lambda: job_status(api, job_id) == "COMPLETED", timeout=60)
        tasks = tasks_of(api, job_id)
        assert len(tasks) == 24 and {t["TaskStatus"] for t in tasks.values()} == {"SUCCEEDED"}, [
            (t["DeviceName"], t["TaskStatus"], t.get("TaskDesc")) for t in tasks.values() if t["TaskStatus"] != "SUCCEEDED"]
        with engine.connect() as conn:
            after = {row.task_id: row for row in conn.execute(sa.text(
                "SELECT t.task_id, t.message_id, t.attempt FROM ota_tasks t JOIN ota_jobs j ON j.id = t.job_pk "
                "WHERE j.job_id = :j"), {"j": job_id})}
        retried = {task for task, row in after.items() if row.attempt == 2}
        assert {row.attempt for row in after.values()} <= {1, 2} and len(retried) <= 2, after
        # An attempt is dispatched once: its push id never changes.
        assert all(after[task].message_id == message for task, message in before.items() if task not in retried)
        stats = sim.wait(lambda s: s["versions"] == {"2.0.0": 24})
        assert stats["duplicates"] == 0, stats  # no device got one push twice
    finally:
        sim.kill()
        engine.dispose()
