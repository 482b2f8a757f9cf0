"""Jobs and tasks through the services on a real SQLite database (no server, no MQTT): the
dispatcher is ticked with explicit clocks and devices "report" by calling DeviceOtaService, the
same calls the device channel makes. The end-to-end tests drive the same paths over the wire."""

from __future__ import annotations

import contextlib
import time

import pytest
import sqlalchemy as sa

from otaplane import errors
from otaplane.server import prepare
from otaplane.services import task_flow
from otaplane.services.container import Services
from otaplane.services.device_ota import PUSH_AGAIN_QUIET_MS
from otaplane.services.devices import DeviceRef
from otaplane.services.firmware import NewFirmware
from otaplane.services.jobs import DYNAMIC, VERIFY, JobSpec, gray_count
from otaplane.services.products import NewProduct
from otaplane.settings import Settings
from otaplane.store import device_ota as device_ota_store
from otaplane.store import uploads
from otaplane.store.schema import device_ota_pending, ota_task_events, ota_tasks
from otaplane.timefmt import now_ms
from tests.conftest import BACKENDS

MINUTE_MS = 1000  # job minutes are one second long here


class Fleet:
    def __init__(self, services: Services, devices: int = 6, need_to_verify: bool = False):
        self.services = services
        services.accounts.create_key("jobs")
        self.tenant = services.accounts.tenant_by_name("jobs")
        self.product = services.products.create(self.tenant, NewProduct(product_name="jobsprod", node_type=0))
        self.pk = self.product.product_key
        self.names = [f"dev-{i:03d}" for i in range(devices)]
        self.ids = {}
        for name in self.names:
            services.devices.register(self.tenant, self.pk, name, None)
            self.ids[name] = services.devices.credentials(self.pk, name).device_id
            services.device_ota.version_reported(self.ids[name], None, "1.0.0")
        self.firmware_id = self.new_firmware("fw2", "2.0.0", need_to_verify)

    def new_firmware(self, name: str, version: str, need_to_verify: bool = False, module: str = "default",
                     content: bytes | None = None, **extra) -> str:
        key = f"ota/{self.tenant.instance_id}/{name}.bin"
        path = self.services.blobs.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode() * 100 if content is None else content)
        with self.services.db.begin() as conn:
            uploads.record(conn, key, self.tenant.instance_pk, int(time.time() * 1000))
        fw = self.services.firmware.create(self.tenant, NewFirmware(
            product_key=self.pk, name=name, dest_version=version, firmware_url=self.services.blobs.object_url(key),
            need_to_verify=need_to_verify, module_name=module, **extra))
        return fw.firmware_id

    def job(self, **kw) -> str:
        spec = JobSpec(firmware_id=kw.pop("firmware_id", self.firmware_id), product_key=self.pk, **kw)
        job_id, _ = self.services.jobs.create(self.tenant, spec)
        return job_id

    def tasks(self, job_id: str) -> dict[str, dict]:
        page = self.services.jobs.tasks_page(self.tenant, job_id, 1, 100, None, None)
        return {t["device_name"]: dict(t) for t in page.items}

    def statuses(self, job_id: str) -> dict[str, str]:
        return {name: t["status"] for name, t in self.tasks(job_id).items()}

    def tick(self, now: int | None = None):
        """One dispatcher pass; by default one second ahead, so the pace (10,000/min unless the
        test says otherwise) lets every due task out."""
        return self.services.dispatcher.tick(now or int(time.time() * 1000) + 1000, review_every_ms=0)

    def deliver_all(self) -> None:
        """What the device channel does: deliver every pushable pending row and ack it."""
        with self.services.db.connect() as conn:
            rows = conn.execute(sa.select(device_ota_pending.c.device_id, device_ota_pending.c.module_name,
                                          device_ota_pending.c.message_id)
                                .where(device_ota_pending.c.delivered_ms.is_(None),
                                       device_ota_pending.c.push.is_(True))).all()
        self.services.device_ota.mark_delivered([tuple(r) for r in rows])

    def upgrade(self, name: str, version: str = "2.0.0") -> None:
        ota = self.services.device_ota
        ota.progress_reported(self.ids[name], None, 10, None)
        ota.progress_reported(self.ids[name], None, 100, None)
        ota.version_reported(self.ids[name], None, version)

    def job_status(self, job_id: str) -> str:
        return self.services.jobs.get(self.tenant, job_id)["status"]

    def firmware(self, firmware_id: str | None = None):
        return self.services.firmware.get(self.tenant, firmware_id or self.firmware_id)


@pytest.fixture(params=BACKENDS)
def settings(request, tmp_path, postgres) -> Settings:
    database_url = postgres.create() if request.param == "postgresql" else ""
    return Settings(data_dir=tmp_path, database_url=database_url, job_minute_seconds=MINUTE_MS / 1000)


@pytest.fixture()
def services(settings):
    services = Services.build(settings)
    prepare(services)
    yield services
    services.close()


@pytest.fixture()
def fleet(services) -> Fleet:
    return Fleet(services)


def test_verify_job_drives_firmware_status_and_progress(services):
    fleet = Fleet(services, devices=2, need_to_verify=True)
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (0, 0)
    with pytest.raises(errors.ApiError) as refused:
        fleet.job(target_selection="ALL")
    assert refused.value.code == "iot.ota.FirmwareNotVerified"

    job_id = fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names)
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (2, 0)
    with pytest.raises(errors.ApiError) as again:
        fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names[:1])
    assert again.value.code == "iot.ota.FirmwareVerifying"

    assert fleet.tick().dispatched == 2
    fleet.deliver_all()
    assert set(fleet.statuses(job_id).values()) == {"NOTIFIED"}
    fleet.upgrade("dev-000")
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (2, 50)
    fleet.upgrade("dev-001")
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (1, 100)
    fleet.tick()
    assert fleet.job_status(job_id) == "COMPLETED"
    job = services.jobs.get(fleet.tenant, job_id)
    assert job["job_type"] == "VERFIY_FIRMWARE" and job["ended_ms"] is not None
    with pytest.raises(errors.ApiError) as verified:
        fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names[:1])
    assert verified.value.code == "iot.ota.FirmwareAlreadyVerified"
    # Now an upgrade job may use it (every device already runs 2.0.0: nothing to do).
    with pytest.raises(errors.ApiError) as nothing:
        fleet.job(target_selection="ALL")
    assert nothing.value.code == "iot.ota.NoDeviceToUpgrade"


def test_a_verify_task_moving_changes_its_package_only_when_status_or_progress_does(services):
    """Every move of a verify job's task (QUEUED -> NOTIFIED -> IN_PROGRESS) rewrote the package's
    UtcModified although its Status and VerifyProgress stayed as they were (found by an audit)."""
    fleet = Fleet(services, devices=2, need_to_verify=True)
    fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names)
    verifying = fleet.firmware()
    assert (verifying.status, verifying.verify_progress) == (2, 0)
    time.sleep(0.01)
    assert fleet.tick().dispatched == 2
    fleet.deliver_all()  # both NOTIFIED
    services.device_ota.progress_reported(fleet.ids["dev-000"], None, 10, None)  # IN_PROGRESS
    assert fleet.firmware().modified_ms == verifying.modified_ms
    fleet.upgrade("dev-000")
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (2, 50)
    assert fleet.firmware().modified_ms > verifying.modified_ms


def test_a_verified_package_stays_verified(services):
    """Verify job 1 failed on one device while another of its devices was still upgrading; job 2
    then verified the package; job 1's last device finishing took it back to "verify failed",
    which refused the upgrade jobs already allowed (found by an audit)."""
    fleet = Fleet(services, devices=3, need_to_verify=True)
    first = fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=["dev-000", "dev-001"])
    fleet.tick()
    fleet.deliver_all()
    services.device_ota.progress_reported(fleet.ids["dev-000"], None, -2, "download failed")
    assert fleet.firmware().status == 3
    fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=["dev-002"])
    fleet.tick()
    fleet.deliver_all()
    fleet.upgrade("dev-002")
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (1, 100)
    fleet.upgrade("dev-001")  # the first job's last device
    assert fleet.firmware().status == 1
    assert fleet.statuses(first)["dev-001"] == "SUCCEEDED"


def test_deleting_the_device_a_verify_job_waits_for_decides_the_verification(services):
    """The deleted device's task went with it and nothing looked at the package again: it stayed
    "verifying" for good, refusing every verify and upgrade job (found by an audit). Decided, it
    is not verified: the deleted device never succeeded (it counts as cancelled), and only the
    devices left had been counted, which verified the package (found by a later audit)."""
    fleet = Fleet(services, devices=3, need_to_verify=True)
    fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names[:2])
    fleet.tick()
    fleet.deliver_all()
    fleet.upgrade("dev-000")
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (2, 50)
    services.devices.delete(fleet.tenant, DeviceRef(product_key=fleet.pk, device_name="dev-001"))
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (0, 50)
    with pytest.raises(errors.ApiError) as refused:
        fleet.job(target_selection="ALL")
    assert refused.value.code == "iot.ota.FirmwareNotVerified"
    fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=["dev-002"])  # may verify again


def test_a_failed_verification_stays_failed_when_its_device_is_deleted(services):
    """Deleting the device whose verification failed took its FAILED task away, and the devices
    left (all succeeded, then or later) verified the package (found by an audit)."""
    fleet = Fleet(services, devices=3, need_to_verify=True)
    fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names)
    fleet.tick()
    fleet.deliver_all()
    fleet.upgrade("dev-000")
    services.device_ota.progress_reported(fleet.ids["dev-001"], None, -4, "flash failed")
    assert fleet.firmware().status == 3
    services.devices.delete(fleet.tenant, DeviceRef(product_key=fleet.pk, device_name="dev-001"))
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (3, 33)
    fleet.upgrade("dev-002")  # the job's last device, after the deletion
    assert (fleet.firmware().status, fleet.firmware().verify_progress) == (3, 66)
    with pytest.raises(errors.ApiError) as refused:
        fleet.job(target_selection="ALL")
    assert refused.value.code == "iot.ota.FirmwareNotVerified"


def test_a_failure_step_fails_verification(services):
    fleet = Fleet(services, devices=2, need_to_verify=True)
    job_id = fleet.job(job_type=VERIFY, target_selection="SPECIFIC", device_names=fleet.names)
    fleet.tick()
    fleet.deliver_all()
    services.device_ota.progress_reported(fleet.ids["dev-000"], None, -3, None)
    tasks = fleet.tasks(job_id)
    assert tasks["dev-000"]["status"] == "FAILED"
    assert "verify failed" in tasks["dev-000"]["description"]
    assert fleet.firmware().status == 3


def test_static_all_job_succeeds_by_version_not_by_progress(fleet):
    job_id = fleet.job(target_selection="ALL")
    assert set(fleet.statuses(job_id).values()) == {"QUEUED"}
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    ota.progress_reported(fleet.ids["dev-000"], None, 100, None)
    assert fleet.statuses(job_id)["dev-000"] == "IN_PROGRESS"
    assert fleet.tasks(job_id)["dev-000"]["progress"] == 100
    ota.version_reported(fleet.ids["dev-000"], None, "1.5.0")  # neither the version it ran nor the new one
    assert fleet.tasks(job_id)["dev-000"]["status"] == "FAILED"
    assert fleet.tasks(job_id)["dev-000"]["description"] == "report version is not conform"
    for name in fleet.names[1:]:
        fleet.upgrade(name)
    assert list(fleet.statuses(job_id).values()).count("SUCCEEDED") == 5
    fleet.tick()
    assert fleet.job_status(job_id) == "COMPLETED"


def test_history_records_every_change(fleet):
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    fleet.tick()
    fleet.deliver_all()
    fleet.upgrade("dev-000")
    task_pk = fleet.tasks(job_id)["dev-000"]["id"]
    with fleet.services.db.connect() as conn:
        events = conn.execute(sa.select(ota_task_events.c.from_status, ota_task_events.c.to_status,
                                        ota_task_events.c.actor)
                              .where(ota_task_events.c.task_pk == task_pk).order_by(ota_task_events.c.id)).all()
    assert [tuple(e) for e in events] == [
        (None, "QUEUED", "api:CreateOTAStaticUpgradeJob"), ("QUEUED", "NOTIFIED", "device"),
        ("NOTIFIED", "IN_PROGRESS", "device"), ("IN_PROGRESS", "SUCCEEDED", "device"),
    ]


def test_illegal_transitions_are_refused(fleet):
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    fleet.tick()
    fleet.deliver_all()
    fleet.upgrade("dev-000")
    task_pk = fleet.tasks(job_id)["dev-000"]["id"]
    with fleet.services.db.begin() as conn:
        for target in ("QUEUED", "NOTIFIED", "IN_PROGRESS", "FAILED", "CANCELED", "CONFIRM"):
            assert task_flow.move(conn, [task_pk], target, actor="test", now_ms=1) == []
    assert fleet.statuses(job_id)["dev-000"] == "SUCCEEDED"


def test_pacing_follows_maximum_per_minute(fleet):
    job_id = fleet.job(target_selection="ALL", max_per_minute=60)  # one per second
    created = fleet.services.jobs.get(fleet.tenant, job_id)["created_ms"]
    assert fleet.tick(created).dispatched == 1
    assert fleet.tick(created + 500).dispatched == 0
    assert fleet.tick(created + 1000).dispatched == 1
    assert fleet.tick(created + 3000).dispatched == 2
    assert fleet.tick(created + 3000).dispatched == 0


def test_a_new_maximum_per_minute_applies_to_the_next_push(fleet):
    job_id = fleet.job(target_selection="ALL", max_per_minute=10)  # one per 6 s
    created = fleet.services.jobs.get(fleet.tenant, job_id)["created_ms"]
    assert fleet.tick(created).dispatched == 1
    assert fleet.tick(created + 1000).dispatched == 0  # the next slot is 6 s away
    fleet.services.jobs.update(fleet.tenant, job_id, 600, "ALL", "STATIC", None, None, None)  # one per 0.1 s
    assert fleet.tick(created + 1000).dispatched == 5  # not after the old 6 s slot: the other five now


def test_timeout_then_retry_succeeds(fleet):
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"], timeout_minutes=2,
                       retry_count=1, retry_interval=0)
    fleet.tick()
    fleet.deliver_all()
    fleet.services.device_ota.progress_reported(fleet.ids["dev-000"], None, 20, None)
    task = fleet.tasks(job_id)["dev-000"]
    assert task["deadline_ms"] is not None
    old_message = task["message_id"]
    result = fleet.tick(task["deadline_ms"] + 1)
    # One tick: timed out, retried at once (RetryInterval 0), dispatched again with a new push id.
    assert (result.timed_out, result.retried, result.dispatched) == (1, 1, 1)
    task = fleet.tasks(job_id)["dev-000"]
    assert (task["status"], task["attempt"], task["retries_left"]) == ("QUEUED", 2, 0)
    assert task["description"] == "upgrade timed out" and task["message_id"] != old_message
    with fleet.services.db.connect() as conn:
        events = conn.execute(sa.select(ota_task_events.c.to_status, ota_task_events.c.reason)
                              .where(ota_task_events.c.task_pk == task["id"]).order_by(ota_task_events.c.id)).all()
    assert [tuple(e) for e in events][-2:] == [("FAILED", "upgrade timed out"), ("QUEUED", "retry")]
    fleet.deliver_all()
    fleet.upgrade("dev-000")
    task = fleet.tasks(job_id)["dev-000"]
    assert (task["status"], task["description"]) == ("SUCCEEDED", None)


def test_retry_waits_for_its_interval(fleet):
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"], retry_count=2, retry_interval=10)
    fleet.tick()
    fleet.deliver_all()
    fleet.services.device_ota.progress_reported(fleet.ids["dev-000"], None, -2, "http 404")
    task = fleet.tasks(job_id)["dev-000"]
    assert task["status"] == "FAILED" and task["description"] == "http 404 (step -2)"
    due = task["due_ms"]
    assert due >= task["modified_ms"] + 10 * MINUTE_MS
    fleet.tick(due - 1)
    assert fleet.statuses(job_id)["dev-000"] == "FAILED"
    fleet.tick(due)
    assert fleet.statuses(job_id)["dev-000"] == "QUEUED"
    fleet.tick(due - 1, )  # the review must not complete the job while a retry is pending
    assert fleet.job_status(job_id) == "IN_PROGRESS"


@pytest.mark.parametrize("cancel", ["by job", "by device"])
def test_cancelling_the_tasks_stops_a_retry_already_scheduled(fleet, cancel):
    """A failed task waiting for its retry was queued and pushed again after the operator had
    cancelled the job's tasks (found by an audit)."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"], retry_count=2, retry_interval=10)
    fleet.tick()
    fleet.deliver_all()
    fleet.services.device_ota.progress_reported(fleet.ids["dev-000"], None, -2, "http 404")
    due = fleet.tasks(job_id)["dev-000"]["due_ms"]
    if cancel == "by job":
        fleet.services.jobs.cancel_by_job(fleet.tenant, job_id, scheduled=True, queued=True, in_progress=True,
                                          notified=True, unconfirmed=True)
    else:
        fleet.services.jobs.cancel_by_device(fleet.tenant, fleet.pk, fleet.firmware_id, ["dev-000"], None)
    fleet.tick(due + 1)
    assert fleet.statuses(job_id)["dev-000"] == "FAILED"
    fleet.tick(due + 2)
    assert fleet.job_status(job_id) == "COMPLETED"  # nothing left to wait for


def test_a_push_outside_jobs_makes_way_only_when_told_to(fleet):
    """`otaplane devices push` replaced the push of a job task, which then waited for good (found
    by an audit): the tasks in its way are named, and cancelled only when the operator says so,
    as is a failed task's retry (it would push its package over the operator's)."""
    running = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    retrying = fleet.job(target_selection="SPECIFIC", device_names=["dev-001"], retry_count=2, retry_interval=10)
    fleet.tick()
    fleet.deliver_all()
    fleet.services.device_ota.progress_reported(fleet.ids["dev-001"], None, -2, "http 404")
    jobs = fleet.services.jobs
    for name, job_id, status in (("dev-000", running, "NOTIFIED"), ("dev-001", retrying, "FAILED")):
        ref = DeviceRef(product_key=fleet.pk, device_name=name)
        in_the_way = jobs.make_way_for_push(fleet.tenant, ref, fleet.firmware_id, cancel=False)
        assert [(t["job_id"], t["status"]) for t in in_the_way] == [(job_id, status)]
        assert fleet.statuses(job_id)[name] == status  # named only
        jobs.make_way_for_push(fleet.tenant, ref, fleet.firmware_id, cancel=True)
        assert jobs.make_way_for_push(fleet.tenant, ref, fleet.firmware_id, cancel=False) == []
    assert fleet.tasks(running)["dev-000"]["status"] == "CANCELED"
    assert fleet.tasks(running)["dev-000"]["description"] == "replaced by a push from the CLI"
    assert fleet.tasks(retrying)["dev-001"]["due_ms"] is None  # no retry


def test_a_dynamic_job_skips_a_busy_device_and_takes_it_once_free(fleet):
    """A device busy at the dynamic job's creation got a FAILED task there, which kept it out of
    the job for good; a device busy when it reports is only skipped (found by an audit)."""
    static = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    dynamic = fleet.job(selection_type=DYNAMIC, src_versions=["1.0.0"], dynamic_mode=1)
    assert "dev-000" not in fleet.tasks(dynamic) and len(fleet.tasks(dynamic)) == 5
    fleet.services.jobs.cancel_by_job(fleet.tenant, static, scheduled=True, queued=True, in_progress=True,
                                      notified=True, unconfirmed=True)
    fleet.services.device_ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")
    assert fleet.statuses(dynamic)["dev-000"] == "QUEUED"


def test_reupgrade_after_the_schedule_finish_time_is_refused(fleet):
    """It answered Success, pushed, and the dispatcher cancelled the task at once (found by an audit)."""
    from otaplane.store import jobs as job_store

    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    fleet.tick()
    fleet.deliver_all()
    fleet.services.device_ota.progress_reported(fleet.ids["dev-000"], None, -2, "http 404")
    with fleet.services.db.begin() as conn:
        job_store.update_job(conn, job_store.job(conn, fleet.tenant.instance_pk, job_id)["id"],
                             {"schedule_finish_ms": int(time.time() * 1000) - 1000})
    task_id = fleet.tasks(job_id)["dev-000"]["task_id"]
    with pytest.raises(errors.ApiError) as refused:
        fleet.services.jobs.reupgrade(fleet.tenant, job_id, [task_id])
    assert refused.value.code == "iot.ota.JobFinished"
    assert fleet.statuses(job_id)["dev-000"] == "FAILED"


def test_progress_only_moves_forward(fleet):
    """Replicas behind a shared subscription applied one device's steps out of order: a 90 after
    the 100 left the task at 90 (found by an audit of two replicas)."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    for step in (10, 100, 90):
        ota.progress_reported(fleet.ids["dev-000"], None, step, None)
    assert fleet.tasks(job_id)["dev-000"]["progress"] == 100


def _delivered(fleet, name: str) -> bool:
    with fleet.services.db.connect() as conn:
        return conn.execute(sa.select(device_ota_pending.c.delivered_ms)
                            .where(device_ota_pending.c.device_id == fleet.ids[name])).scalar() is not None


def _age_the_push(fleet, name: str, seconds: float) -> None:
    """As if the push was delivered, and the device last reported, `seconds` ago."""
    ago = int(time.time() * 1000 - seconds * 1000)
    with fleet.services.db.begin() as conn:
        conn.execute(sa.update(device_ota_pending).where(device_ota_pending.c.device_id == fleet.ids[name])
                     .values(delivered_ms=ago, modified_ms=ago))


def test_a_device_back_on_its_old_version_is_pushed_again(fleet):
    """It took the push and lost power before any progress (or its download broke): booted
    again, it reports the version it ran. The task stayed NOTIFIED for good, never pushed again
    and never timed out (its timeout counts from the first progress), blocking the device's
    later jobs (found by an audit with the linkkit SDK). The platform pushes again."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000", "dev-001"])
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")  # as the push went out: not sent twice
    assert _delivered(fleet, "dev-000")
    _age_the_push(fleet, "dev-000", 30)
    ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")  # booted again on its old version
    assert not _delivered(fleet, "dev-000")  # the device channel pushes it again
    assert fleet.statuses(job_id)["dev-000"] == "NOTIFIED"
    ota.progress_reported(fleet.ids["dev-001"], None, 40, None)
    _age_the_push(fleet, "dev-001", 5)  # downloading: progress 5 s ago
    ota.version_reported(fleet.ids["dev-001"], None, "1.0.0")
    assert _delivered(fleet, "dev-001")  # not sent again in the middle of a download
    assert fleet.statuses(job_id)["dev-001"] == "IN_PROGRESS"
    row = _push_row(fleet, "dev-001")  # unless no progress comes by 10 s after the last one
    assert row["push_again_ms"] == row["modified_ms"] + PUSH_AGAIN_QUIET_MS
    ota.progress_reported(fleet.ids["dev-001"], None, 50, None)
    assert _push_row(fleet, "dev-001")["push_again_ms"] is None


def _push_row(fleet, name: str):
    with fleet.services.db.connect() as conn:
        return conn.execute(sa.select(device_ota_pending)
                            .where(device_ota_pending.c.device_id == fleet.ids[name])).mappings().first()


def test_a_device_that_restarts_within_the_quiet_period_is_pushed_again_when_it_ends(fleet):
    """It took the push and restarted at once, before any progress: the one version report it
    makes on reconnecting came within 10 s of the push and was dropped (that quiet period keeps
    the push from going twice to a device that reports as it goes out), so the push never went
    again and the task stayed NOTIFIED until its timeout, or for good without one (found by an
    audit). Now the report schedules the push for the end of the quiet period."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    fleet.tick()
    fleet.deliver_all()
    now = int(time.time() * 1000)
    with fleet.services.db.begin() as conn:  # made a minute ago, delivered 2 s ago (the device was offline)
        conn.execute(sa.update(device_ota_pending).where(device_ota_pending.c.device_id == fleet.ids["dev-000"])
                     .values(modified_ms=now - 60_000, delivered_ms=now - 2_000))
    ota = fleet.services.device_ota
    message_id = _push_row(fleet, "dev-000")["message_id"]
    ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")  # restarted: its one report
    row = _push_row(fleet, "dev-000")
    assert row["delivered_ms"] == now - 2_000  # not pushed again now ...
    assert row["push_again_ms"] == now - 2_000 + PUSH_AGAIN_QUIET_MS  # ... but 10 s after the delivery
    assert ota.undelivered(online_only=False) == []
    assert ota.push_due_again(now=row["push_again_ms"] - 1) == 0
    ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")  # a second report changes nothing
    assert _push_row(fleet, "dev-000")["push_again_ms"] == row["push_again_ms"]
    assert ota.push_due_again(now=row["push_again_ms"]) == 1
    [again] = ota.undelivered(online_only=False)  # for the device channel to send again, as a new message
    assert again.device_id == fleet.ids["dev-000"] and again.message_id != message_id
    assert fleet.statuses(job_id)["dev-000"] == "NOTIFIED"
    fleet.deliver_all()
    assert _push_row(fleet, "dev-000")["push_again_ms"] is None
    assert ota.push_due_again(now=row["push_again_ms"] + 60_000) == 0  # once
    fleet.upgrade("dev-000")
    assert fleet.statuses(job_id)["dev-000"] == "SUCCEEDED"


def test_a_push_scheduled_to_go_again_is_called_off_by_what_the_device_does_meanwhile(fleet):
    """Progress (it has the push), another version (the task fails), the DestVersion (it
    succeeds), asking for the package (firmware/get: it has it now), a cancelled task: the
    scheduled push does not go."""
    job_id = fleet.job(target_selection="ALL")
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    for name in fleet.names:
        ota.version_reported(fleet.ids[name], None, "1.0.0")  # reported as the push went out
        assert _push_row(fleet, name)["push_again_ms"] is not None
    ota.progress_reported(fleet.ids["dev-000"], None, 0, None)
    ota.version_reported(fleet.ids["dev-001"], None, "1.5.0")
    ota.version_reported(fleet.ids["dev-002"], None, "2.0.0")
    assert ota.offer(fleet.ids["dev-003"], None).version == "2.0.0"
    fleet.services.jobs.cancel_by_device(fleet.tenant, fleet.pk, fleet.firmware_id, ["dev-004"], None)
    due = _push_row(fleet, "dev-005")["push_again_ms"]
    assert ota.push_due_again(now=due + 60_000) == 1  # dev-005 only: it did nothing
    assert [k.device_id for k in ota.undelivered(online_only=False)] == [fleet.ids["dev-005"]]
    assert _push_row(fleet, "dev-000")["push_again_ms"] is None and _delivered(fleet, "dev-000")
    assert _push_row(fleet, "dev-003")["push_again_ms"] is None and _delivered(fleet, "dev-003")
    assert _push_row(fleet, "dev-001") is None and _push_row(fleet, "dev-002") is None
    assert _push_row(fleet, "dev-004") is None
    assert fleet.statuses(job_id) == {"dev-000": "IN_PROGRESS", "dev-001": "FAILED", "dev-002": "SUCCEEDED",
                                      "dev-003": "NOTIFIED", "dev-004": "CANCELED", "dev-005": "NOTIFIED"}


def test_the_version_a_device_runs_when_pushed_is_its_tasks_src_version(fleet):
    """A paced task's device moved on (1.0.0 -> 1.5.0) before its push; restarted before any
    progress, it reported 1.5.0 and its task failed as "not conform" instead of being pushed
    again: the task compared with the version at its creation (found by an audit)."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    ota = fleet.services.device_ota
    ota.version_reported(fleet.ids["dev-000"], None, "1.5.0")  # before the dispatcher's turn
    fleet.tick()
    fleet.deliver_all()
    assert fleet.tasks(job_id)["dev-000"]["src_version"] == "1.5.0"
    _age_the_push(fleet, "dev-000", 30)
    ota.version_reported(fleet.ids["dev-000"], None, "1.5.0")
    assert fleet.statuses(job_id)["dev-000"] == "NOTIFIED" and not _delivered(fleet, "dev-000")


def test_an_installing_device_that_reports_its_old_version_is_neither_failed_nor_pushed_again(fleet):
    """At 100 it has the package; a reconnect before its restart reports the old version. That
    failed the task ("report version is not conform"), and the new version reported after the
    restart did not mend it (found by an audit). Now only another version fails it; an install
    that did not take ends at the task's timeout."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    ota.progress_reported(fleet.ids["dev-000"], None, 100, None)
    _age_the_push(fleet, "dev-000", 30)
    ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")
    assert fleet.statuses(job_id)["dev-000"] == "IN_PROGRESS" and _delivered(fleet, "dev-000")
    ota.version_reported(fleet.ids["dev-000"], None, "2.0.0")
    assert fleet.statuses(job_id)["dev-000"] == "SUCCEEDED"


def test_a_device_already_on_the_dest_version_succeeds_before_its_push(fleet):
    """A paced task not pushed yet, and a failed one waiting for its retry: the device reporting
    the DestVersion was ignored (only pushed tasks heard version reports), then pushed the
    package it runs (found by an audit)."""
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000", "dev-001"], retry_count=1,
                       retry_interval=60)
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    ota.progress_reported(fleet.ids["dev-001"], None, -2, "dns failure")
    assert fleet.statuses(job_id)["dev-001"] == "FAILED"  # its retry is due in an hour
    ota.version_reported(fleet.ids["dev-001"], None, "2.0.0")  # it recovered by itself
    assert fleet.statuses(job_id)["dev-001"] == "SUCCEEDED"
    paced = fleet.job(firmware_id=fleet.new_firmware("fw3", "3.0.0"), target_selection="SPECIFIC",
                      device_names=["dev-002"], max_per_minute=10)
    assert fleet.statuses(paced)["dev-002"] == "QUEUED"
    ota.version_reported(fleet.ids["dev-002"], None, "3.0.0")
    assert fleet.statuses(paced)["dev-002"] == "SUCCEEDED"
    fleet.tick()
    with fleet.services.db.connect() as conn:  # and nothing is pushed to it
        assert conn.execute(sa.select(device_ota_pending.c.firmware_pk)
                            .where(device_ota_pending.c.device_id == fleet.ids["dev-002"])).first() is None


def test_confirm_and_cancel(fleet):
    job_id = fleet.job(target_selection="ALL", need_confirm=True)
    assert set(fleet.statuses(job_id).values()) == {"CONFIRM"}
    assert fleet.tick().dispatched == 0
    tasks = fleet.tasks(job_id)
    fleet.services.jobs.confirm(fleet.tenant, [tasks["dev-000"]["task_id"], tasks["dev-001"]["task_id"]])
    assert fleet.tick().dispatched == 2
    with pytest.raises(errors.ApiError) as no_flag:
        fleet.services.jobs.cancel_by_job(fleet.tenant, job_id, scheduled=False, queued=False, in_progress=False,
                                          notified=False, unconfirmed=None)
    assert no_flag.value.code == "iot.ota.CancelParamRequired"
    fleet.services.jobs.cancel_by_job(fleet.tenant, job_id, scheduled=False, queued=False, in_progress=False,
                                      notified=False, unconfirmed=True)
    statuses = fleet.statuses(job_id)
    assert statuses["dev-000"] == statuses["dev-001"] == "QUEUED"
    assert [statuses[n] for n in fleet.names[2:]] == ["CANCELED"] * 4
    fleet.services.jobs.cancel_by_device(fleet.tenant, fleet.pk, fleet.firmware_id, ["dev-000"], None)
    assert fleet.statuses(job_id)["dev-000"] == "CANCELED"
    with fleet.services.db.connect() as conn:  # dev-000's push is withdrawn, dev-001's is not
        devices = set(conn.execute(sa.select(device_ota_pending.c.device_id)).scalars())
    assert devices == {fleet.ids["dev-001"]}
    # Re-upgrade the cancelled dev-000: a new attempt that needs confirming again.
    task_id = fleet.tasks(job_id)["dev-000"]["task_id"]
    fleet.services.jobs.reupgrade(fleet.tenant, job_id, [task_id])
    task = fleet.tasks(job_id)["dev-000"]
    assert (task["status"], task["attempt"]) == ("CONFIRM", 2)
    with pytest.raises(errors.ApiError) as wrong:
        fleet.services.jobs.reupgrade(fleet.tenant, job_id, [fleet.tasks(job_id)["dev-001"]["task_id"]])
    assert wrong.value.code == "iot.ota.TaskCanNotReupgrade"


def test_overwrite_modes(fleet):
    first = fleet.job(target_selection="SPECIFIC", device_names=["dev-000", "dev-001"])
    other = fleet.new_firmware("fw3", "3.0.0")
    kept = fleet.job(firmware_id=other, target_selection="SPECIFIC", device_names=["dev-000"], overwrite_mode=1)
    assert fleet.statuses(first)["dev-000"] == "QUEUED"
    task = fleet.tasks(kept)["dev-000"]
    assert task["status"] == "FAILED" and first in task["description"]
    overwritten = fleet.job(firmware_id=other, target_selection="SPECIFIC", device_names=["dev-001"],
                            overwrite_mode=2)
    assert fleet.statuses(first)["dev-001"] == "CANCELED"
    assert fleet.statuses(overwritten)["dev-001"] == "QUEUED"


def test_multi_module_mode(fleet):
    """A device upgrades one module at a time, unless both jobs allow several modules at once."""
    fleet.services.modules.create(fleet.tenant, fleet.pk, "mcu", None, None)
    fleet.services.modules.create(fleet.tenant, fleet.pk, "wifi", None, None)
    mcu = fleet.new_firmware("fwmcu", "5.0.0", module="mcu")
    wifi = fleet.new_firmware("fwwifi", "6.0.0", module="wifi")
    # dev-000: a single-module job holds it, so a job for another module cannot take it...
    default = fleet.job(target_selection="SPECIFIC", device_names=["dev-000", "dev-001"])
    refused = fleet.job(firmware_id=mcu, target_selection="SPECIFIC", device_names=["dev-000"], multi_module=True)
    task = fleet.tasks(refused)["dev-000"]
    assert task["status"] == "FAILED" and default in task["description"]
    # ...and OverwriteMode 2 (single-module) takes it over, cancelling the other module's task.
    fleet.job(firmware_id=mcu, target_selection="SPECIFIC", device_names=["dev-001"], overwrite_mode=2)
    assert fleet.statuses(default)["dev-001"] == "CANCELED"
    # dev-002: two multi-module jobs for different modules run side by side...
    first = fleet.job(firmware_id=mcu, target_selection="SPECIFIC", device_names=["dev-002"], multi_module=True)
    second = fleet.job(firmware_id=wifi, target_selection="SPECIFIC", device_names=["dev-002"], multi_module=True)
    assert fleet.statuses(first)["dev-002"] == "QUEUED" and fleet.statuses(second)["dev-002"] == "QUEUED"
    # ...but a single-module job for a third module still waits for the device to be free.
    third = fleet.job(target_selection="SPECIFIC", device_names=["dev-002"])
    assert fleet.statuses(third)["dev-002"] == "FAILED"


def test_download_protocol_mqtt_takes_single_file_packages_up_to_16_mb(fleet):
    big = fleet.new_firmware("big", "7.0.0", content=b"\0" * (16 * 1024 * 1024 + 1))
    with pytest.raises(errors.ApiError) as refused:
        fleet.job(firmware_id=big, target_selection="ALL", download_protocol="MQTT")
    assert refused.value.code == "InvalidParameter" and "16 MB" in str(refused.value)
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"], download_protocol="MQTT")
    fleet.tick()
    package = fleet.services.device_ota.offer(fleet.ids["dev-000"], None)  # what the push carries
    assert package.mqtt_stream is not None and package.mqtt_stream > 0
    assert fleet.statuses(job_id) == {"dev-000": "NOTIFIED"}


def test_gray_rounds_down_but_takes_one_device(fleet):
    assert gray_count(6, "33.33") == 1
    assert gray_count(6, "50") == 3
    assert gray_count(3, "10") == 1
    job_id = fleet.job(target_selection="GRAY", gray_percent="50")
    assert len(fleet.tasks(job_id)) == 3


def test_src_version_filter(fleet):
    fleet.services.device_ota.version_reported(fleet.ids["dev-005"], None, "0.9")
    job_id = fleet.job(target_selection="ALL", src_versions=["0.9"])
    assert list(fleet.tasks(job_id)) == ["dev-005"]


def test_dynamic_job_takes_devices_that_report_a_matching_version(fleet):
    job_id = fleet.job(selection_type=DYNAMIC, src_versions=["1.5"], dynamic_mode=1)
    assert fleet.tasks(job_id) == {}
    fleet.services.device_ota.version_reported(fleet.ids["dev-002"], None, "1.5")
    assert fleet.statuses(job_id) == {"dev-002": "QUEUED"}
    fleet.services.device_ota.version_reported(fleet.ids["dev-002"], None, "1.5")  # once per device
    assert len(fleet.tasks(job_id)) == 1
    fleet.tick()
    fleet.deliver_all()
    fleet.upgrade("dev-002")
    assert fleet.statuses(job_id) == {"dev-002": "SUCCEEDED"}
    fleet.tick()
    assert fleet.job_status(job_id) == "IN_PROGRESS"  # dynamic jobs keep running
    with pytest.raises(errors.ApiError) as second:
        fleet.job(selection_type=DYNAMIC, src_versions=["1.0.0"], dynamic_mode=1)
    assert second.value.code == "iot.ota.DynamicJobExisted"
    fleet.services.jobs.cancel_strategy(fleet.tenant, job_id)
    assert fleet.job_status(job_id) == "CANCELED"
    fleet.services.device_ota.version_reported(fleet.ids["dev-003"], None, "1.5")
    assert list(fleet.tasks(job_id)) == ["dev-002"]


def test_a_dynamic_job_whose_strategy_is_cancelled_still_serves_its_tasks(fleet):
    """CancelOTAStrategyByJob stops new devices only: the tasks not pushed yet stayed QUEUED for
    ever (the dispatcher served IN_PROGRESS jobs only) and blocked their devices (found by an audit)."""
    job_id = fleet.job(selection_type=DYNAMIC, src_versions=["1.0.0"], dynamic_mode=1)
    assert set(fleet.statuses(job_id).values()) == {"QUEUED"}
    fleet.services.jobs.cancel_strategy(fleet.tenant, job_id)
    assert fleet.job_status(job_id) == "CANCELED"
    fleet.tick()
    fleet.deliver_all()
    assert set(fleet.statuses(job_id).values()) == {"NOTIFIED"}
    fleet.services.device_ota.version_reported(fleet.ids["dev-000"], None, "1.0.0")  # no new task either
    assert len(fleet.tasks(job_id)) == 6


def test_a_diff_package_goes_only_to_devices_on_its_base_version(fleet):
    """A SrcVersion list without the diff's base emptied the filter, and "no filter" sent the diff
    to every device whatever its version; dynamic jobs never checked the base (found by an audit)."""
    diff = fleet.new_firmware("diff", "3.0.0", type=1, src_version="1.0.0")
    fleet.services.device_ota.version_reported(fleet.ids["dev-001"], None, "0.5")
    with pytest.raises(errors.ApiError) as refused:
        fleet.job(firmware_id=diff, target_selection="ALL", src_versions=["0.5"])
    assert refused.value.code == "InvalidParameter"
    static = fleet.job(firmware_id=diff, target_selection="ALL")
    assert "dev-001" not in fleet.tasks(static) and len(fleet.tasks(static)) == 5
    fleet.services.jobs.cancel_by_job(fleet.tenant, static, scheduled=True, queued=True, in_progress=True,
                                      notified=True, unconfirmed=True)
    dynamic = fleet.job(firmware_id=diff, selection_type=DYNAMIC, src_versions=["1.0.0", "0.5"], dynamic_mode=2)
    fleet.services.device_ota.version_reported(fleet.ids["dev-001"], None, "0.5")
    fleet.services.device_ota.version_reported(fleet.ids["dev-002"], None, "1.0.0")
    assert list(fleet.tasks(dynamic)) == ["dev-002"]


def test_dynamic_mode_1_takes_matching_devices_now(fleet):
    job_id = fleet.job(selection_type=DYNAMIC, src_versions=["1.0.0"], dynamic_mode=1)
    assert len(fleet.tasks(job_id)) == 6
    mode2 = fleet.new_firmware("fw4", "4.0.0")
    job2 = fleet.job(firmware_id=mode2, selection_type=DYNAMIC, src_versions=["1.0.0"], dynamic_mode=2)
    assert fleet.tasks(job2) == {}


def test_need_push_false_is_only_given_when_asked(fleet):
    job_id = fleet.job(target_selection="SPECIFIC", device_names=["dev-000"], need_push=False)
    result = fleet.tick()
    assert result.dispatched == 1 and result.pushed_devices == []
    ota = fleet.services.device_ota
    assert ota.offers(fleet.ids["dev-000"]) == []  # not pushed on connect
    assert ota.undelivered(online_only=False) == []
    package = ota.offer(fleet.ids["dev-000"], None)  # firmware/get
    assert package is not None and package.version == "2.0.0"
    assert fleet.statuses(job_id)["dev-000"] == "NOTIFIED"


def test_abort_when_failures_pass_the_threshold(fleet):
    job_id = fleet.job(target_selection="ALL", abort_failure_percent=50, abort_minimum_count=2)
    fleet.tick()
    fleet.deliver_all()
    ota = fleet.services.device_ota
    ota.progress_reported(fleet.ids["dev-000"], None, -1, None)
    fleet.tick()
    assert fleet.job_status(job_id) == "IN_PROGRESS"  # one failure: below the minimum count
    ota.progress_reported(fleet.ids["dev-001"], None, -1, None)
    fleet.tick()
    job = fleet.services.jobs.get(fleet.tenant, job_id)
    assert job["status"] == "CANCELED" and "2 of 2" in job["description"]
    assert sorted(fleet.statuses(job_id).values()) == ["CANCELED"] * 4 + ["FAILED"] * 2


class TurnCounter:
    """Counts the dispatcher's write turns (SQLite: the process's write lock; PostgreSQL: its
    write transactions, which lock the job's row)."""

    def __init__(self, db):
        self.turns = 0
        inner = db.write_turn

        @contextlib.contextmanager
        def counted():
            self.turns += 1
            with inner():
                yield

        db.write_turn = counted


def test_the_review_takes_a_write_turn_only_for_a_job_that_may_end(fleet):
    """Once a second the review looks at every running job; a job that cannot end (tasks left,
    failures below its threshold) must not cost a write turn, which would queue the device
    reports and API writes of the process (bench/review.py)."""
    job_id = fleet.job(target_selection="ALL", abort_failure_percent=50, abort_minimum_count=2)
    fleet.tick()
    fleet.deliver_all()
    counter = TurnCounter(fleet.services.db)
    dispatcher = fleet.services.dispatcher
    ota = fleet.services.device_ota
    for name in fleet.names[:4]:
        fleet.upgrade(name)
    ota.progress_reported(fleet.ids["dev-004"], None, -1, None)  # one failure: below the minimum count
    counter.turns = 0
    assert dispatcher._review_jobs(int(time.time() * 1000)) == []
    assert counter.turns == 0 and fleet.job_status(job_id) == "IN_PROGRESS"
    # Its last task finishes: the next review ends the job, in one write turn.
    fleet.upgrade("dev-005")
    assert fleet.job_status(job_id) == "IN_PROGRESS"
    counter.turns = 0  # the reports' own turns
    assert dispatcher._review_jobs(int(time.time() * 1000)) == [job_id]
    assert counter.turns == 1 and fleet.job_status(job_id) == "COMPLETED"
    counter.turns = 0
    assert dispatcher._review_jobs(int(time.time() * 1000)) == [] and counter.turns == 0


def test_the_abort_rule_read_before_the_write_turn_agrees_with_full_counts(services):
    """`_may_abort` counts at most the SUCCEEDED tasks that can matter; whatever the counts, it
    must say what the review's rule says from full counts (it decides which jobs the review
    takes under lock, and the review then decides from full counts)."""
    from types import SimpleNamespace

    from otaplane.services.dispatcher import _may_abort
    from otaplane.store import jobs as job_store

    fleet = Fleet(services, devices=16)
    job_id = fleet.job(target_selection="ALL")
    with services.db.connect() as conn:
        job_pk = conn.execute(sa.select(ota_tasks.c.job_pk)).scalars().first()
        task_pks = conn.execute(sa.select(ota_tasks.c.id).order_by(ota_tasks.c.id)).scalars().all()
    assert len(task_pks) == 16, job_id
    checked = 0
    for succeeded in range(0, 9):
        for failed in range(0, 8):
            for retrying in sorted({0, min(1, failed), failed // 2}):
                with services.db.begin() as conn:
                    conn.execute(sa.update(ota_tasks).values(status="QUEUED", due_ms=None, retries_left=0))
                    ok, bad = task_pks[:succeeded], task_pks[succeeded:succeeded + failed]
                    conn.execute(sa.update(ota_tasks).where(ota_tasks.c.id.in_(ok)).values(status="SUCCEEDED"))
                    conn.execute(sa.update(ota_tasks).where(ota_tasks.c.id.in_(bad)).values(status="FAILED"))
                    conn.execute(sa.update(ota_tasks).where(ota_tasks.c.id.in_(bad[:retrying]))
                                 .values(due_ms=1, retries_left=1))
                with services.db.connect() as conn:
                    counts = job_store.status_counts(conn, job_pk)
                    failures = counts.get("FAILED", 0) - job_store.retry_pending(conn, job_pk)
                    finished = counts.get("SUCCEEDED", 0) + failures
                    for percent in (1, 10, 33.3, 33.4, 50, 66.7, 75, 99, 100):
                        for minimum in (None, 1, 3):
                            share = failures * 100.0 / finished if finished else 0.0
                            expected = failures >= (minimum or 1) and share >= percent
                            job = SimpleNamespace(id=job_pk, abort_failure_percent=percent,
                                                  abort_minimum_count=minimum)
                            assert _may_abort(conn, job) == expected, (succeeded, failed, retrying, percent, minimum)
                            checked += 1
    assert checked > 1000


def test_schedule_plans_then_starts_then_finishes(fleet):
    now = int(time.time() * 1000)
    with pytest.raises(errors.ApiError):
        fleet.job(target_selection="ALL", schedule_ms=now + MINUTE_MS)  # less than 5 "minutes" ahead
    start, finish = now + 6 * MINUTE_MS, now + 70 * MINUTE_MS
    job_id = fleet.job(target_selection="ALL", schedule_ms=start, schedule_finish_ms=finish)
    assert fleet.job_status(job_id) == "PLANNED"
    assert fleet.tick(start - 1).dispatched == 0
    result = fleet.tick(start)
    assert result.started == [job_id]
    assert result.dispatched + fleet.tick(start + 1000).dispatched == 6  # paced from the start time
    assert fleet.job_status(job_id) == "IN_PROGRESS"
    fleet.deliver_all()
    fleet.upgrade("dev-000")
    fleet.tick(finish)
    statuses = fleet.statuses(job_id)
    assert statuses["dev-000"] == "SUCCEEDED" and list(statuses.values()).count("CANCELED") == 5
    assert fleet.job_status(job_id) == "COMPLETED"


def test_a_scheduled_job_whose_tasks_were_all_cancelled_completes_at_once(fleet):
    """It stayed PLANNED until its ScheduleTime, as if it were still going to run (an audit)."""
    now = int(time.time() * 1000)
    job_id = fleet.job(target_selection="ALL", schedule_ms=now + 6 * MINUTE_MS)
    fleet.services.jobs.cancel_by_job(fleet.tenant, job_id, scheduled=True, queued=False, in_progress=False,
                                      notified=False, unconfirmed=None)
    assert set(fleet.statuses(job_id).values()) == {"CANCELED"}
    assert fleet.tick(now + 1000).finished == [job_id]
    job = fleet.services.jobs.get(fleet.tenant, job_id)
    assert job["status"] == "COMPLETED" and job["ended_ms"] is not None
    assert fleet.tick(now + 6 * MINUTE_MS).started == []  # nothing runs at the ScheduleTime


def test_a_scheduled_job_with_tasks_left_stays_planned(fleet):
    now = int(time.time() * 1000)
    job_id = fleet.job(target_selection="ALL", schedule_ms=now + 6 * MINUTE_MS)
    assert fleet.tick(now + 1000).finished == []
    assert fleet.job_status(job_id) == "PLANNED"


def test_restart_loses_nothing_and_does_not_dispatch_twice(settings):
    first = Services.build(settings)
    prepare(first)
    fleet = Fleet(first)
    job_id = fleet.job(target_selection="ALL", max_per_minute=120)  # two per second
    created = first.jobs.get(fleet.tenant, job_id)["created_ms"]
    assert first.dispatcher.tick(created + 1000).dispatched == 3
    with first.db.connect() as conn:
        before = dict(conn.execute(sa.select(ota_tasks.c.id, ota_tasks.c.message_id)
                                   .where(ota_tasks.c.message_id.is_not(None))).all())
    first.close()  # the process goes away

    second = Services.build(settings)
    prepare(second)
    result = second.dispatcher.tick(created + 1000)
    assert result.dispatched == 0  # the pace cursor is in the database too
    result = second.dispatcher.tick(created + 10_000)
    assert result.dispatched == 3
    with second.db.connect() as conn:
        after = dict(conn.execute(sa.select(ota_tasks.c.id, ota_tasks.c.message_id)
                                  .where(ota_tasks.c.message_id.is_not(None))).all())
        pushes = conn.execute(sa.select(sa.func.count()).select_from(device_ota_pending)).scalar()
    assert len(after) == 6 and pushes == 6
    assert all(after[pk] == message for pk, message in before.items())  # the first three kept their push
    second.close()


def test_device_list_file(fleet, services):
    form, _ = services.jobs.new_device_list_upload(fleet.tenant)
    path = services.blobs.root / form.key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("DeviceName\ndev-001\ndev-002\n\n")
    job_id = fleet.job(target_selection="SPECIFIC", device_list_url=form.object_url)
    assert sorted(fleet.tasks(job_id)) == ["dev-001", "dev-002"]
    path.write_text("dev-001\nnobody\n")
    with pytest.raises(errors.ApiError) as missing:
        fleet.job(target_selection="SPECIFIC", device_list_url=form.object_url, overwrite_mode=2)
    assert missing.value.code == "iot.ota.DeviceNotExisted" and "nobody" in missing.value.message


def test_firmware_with_a_running_job_cannot_be_deleted(fleet):
    fleet.job(target_selection="ALL")
    with pytest.raises(errors.ApiError) as refused:
        fleet.services.firmware.delete(fleet.tenant, fleet.firmware_id)
    assert refused.value.code == "iot.ota.FirmwareHasRunningJob"


def test_firmware_with_unfinished_tasks_cannot_be_deleted(fleet):
    """A dynamic job whose strategy was cancelled (JobStatus CANCELED) still serves its tasks:
    deleting its package deleted the job and the tasks' history under them (found by an audit)."""
    job_id = fleet.job(selection_type=DYNAMIC, src_versions=["1.0.0"], dynamic_mode=1)
    fleet.tick()
    fleet.deliver_all()
    fleet.services.jobs.cancel_strategy(fleet.tenant, job_id)
    assert fleet.job_status(job_id) == "CANCELED"
    with pytest.raises(errors.ApiError) as refused:
        fleet.services.firmware.delete(fleet.tenant, fleet.firmware_id)
    assert refused.value.code == "iot.ota.FirmwareHasRunningJob"
    fleet.services.jobs.cancel_by_job(fleet.tenant, job_id, scheduled=False, queued=True, in_progress=True,
                                      notified=True, unconfirmed=None)
    fleet.services.firmware.delete(fleet.tenant, fleet.firmware_id)  # every task finished: it may go


def test_two_dispatchers_on_one_postgresql_never_dispatch_a_task_twice(settings):
    """Two dispatchers (two Services, two connection pools: as two replicas) tick the same job
    at once for two seconds: no task is claimed by both, and together they keep one pace."""
    if not settings.resolved_database_url().startswith("postgresql"):
        pytest.skip("replicas share PostgreSQL; SQLite is one process")
    import threading

    first = Services.build(settings)
    prepare(first)
    second = Services.build(settings)
    fleet = Fleet(first, devices=400)
    job_id = fleet.job(target_selection="ALL", max_per_minute=6000)  # 100 per second
    claims: dict[str, list[int]] = {"first": [], "second": []}

    def recording(name, dispatcher):
        original = dispatcher._claim

        def claim(conn, tasks, now):
            won = original(conn, tasks, now)
            claims[name].extend(task.id for task, _ in won)
            return won
        dispatcher._claim = claim

    recording("first", first.dispatcher)
    recording("second", second.dispatcher)
    started = time.monotonic()

    def run(services):
        while time.monotonic() - started < 2.0:
            services.dispatcher.tick(review_every_ms=1000)
            time.sleep(0.01)

    threads = [threading.Thread(target=run, args=(s,)) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    try:
        both = claims["first"] + claims["second"]
        assert claims["first"] and claims["second"], claims  # both took part
        assert len(both) == len(set(both))  # never the same task twice
        # One shared pace: about 100/s in total, not 100/s each. Allowed on top: the one second an
        # idle job may catch up (MAX_PACE_BANK_US: the job was created before the clock started).
        assert len(both) <= 100 * (elapsed + 1) + 20, (len(both), elapsed)
        with first.db.connect() as conn:
            pushes = conn.execute(sa.select(sa.func.count()).select_from(device_ota_pending)).scalar()
        assert pushes == len(both)
        assert {t["status"] for t in fleet.tasks(job_id).values()} == {"QUEUED"}
    finally:
        second.close()
        first.close()


def test_a_push_is_published_by_one_process_until_its_claim_is_old_or_given_back(settings):
    """Processes on one external broker all see every pending push: each published a push made
    by the CLI (15 of 100 devices got it twice in an audit). The claim is what decides; here two
    processes' services claim the same push at the same instant."""
    first, second = Services.build(settings), Services.build(settings)
    try:
        prepare(first)
        fleet = Fleet(first)
        fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
        fleet.tick()
        [key] = first.device_ota.undelivered(online_only=False)
        claimed, at_ms = first.device_ota.claim([key], "publishing_ms", 30)
        assert claimed == [key]
        assert second.device_ota.claim([key], "publishing_ms", 30)[0] == []  # taken: the other publishes it
        assert second.device_ota.claim([key], "re_offered_ms", 30)[0] == [key]  # another purpose, its own stamp
        first.device_ota.release([key], "publishing_ms", at_ms)  # its publish failed
        assert second.device_ota.claim([key], "publishing_ms", 30)[0] == [key]
        time.sleep(0.01)
        assert first.device_ota.claim([key], "publishing_ms", 0.005)[0] == [key]  # the hold ran out
    finally:
        first.close()
        second.close()


def test_a_new_push_is_not_held_back_by_the_claims_of_the_push_it_replaces(settings):
    """The claims (publishing, re-offer) belong to one push; a new push for the module (a retry's
    attempt, another job, the CLI) replaces the row and kept them, so on an external broker it
    waited out the old claim's 30-s hold before any process published it."""
    first, second = Services.build(settings), Services.build(settings)
    try:
        prepare(first)
        fleet = Fleet(first)
        fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
        fleet.tick()
        [old] = first.device_ota.undelivered(online_only=False)
        for stamp in ("publishing_ms", "re_offered_ms"):
            assert first.device_ota.claim([old], stamp, 30)[0] == [old]
        with first.db.begin() as conn:  # a new push for the module, as push() writes it
            device_ota_store.upsert(conn, old.device_id, old.module_name, _push_row(fleet, "dev-000")["firmware_pk"],
                                    old.message_id + 1, now_ms())
        [new] = second.device_ota.undelivered(online_only=False)
        assert new.message_id == old.message_id + 1
        for stamp in ("publishing_ms", "re_offered_ms"):
            assert second.device_ota.claim([new], stamp, 30)[0] == [new], stamp
    finally:
        first.close()
        second.close()


def test_a_push_scheduled_to_go_again_goes_from_any_process_on_the_database(settings):
    """The time is in the push's row: another process (a replica, or this one restarted) makes it
    undelivered at its first sweep once it is due; on an external broker the claim of the push's
    first publish does not hold the second one back."""
    first = Services.build(settings.model_copy(update={"push_again_quiet_seconds": 1.5}))
    second = Services.build(settings)
    try:
        prepare(first)
        fleet = Fleet(first)
        fleet.job(target_selection="SPECIFIC", device_names=["dev-000"])
        fleet.tick()
        [key] = first.device_ota.undelivered(online_only=False)
        claimed, _ = first.device_ota.claim([key], "publishing_ms", 30)  # an external broker's publish
        assert claimed == [key]
        first.device_ota.mark_delivered([(key.device_id, key.module_name, key.message_id)])
        first.device_ota.version_reported(key.device_id, None, "1.0.0")
        due = _push_row(fleet, "dev-000")["push_again_ms"]
        assert due is not None and first.device_ota.undelivered(online_only=False) == []
        first.close()
        time.sleep(max(0.0, due / 1000 - time.time()) + 0.05)
        [again] = second.device_ota.undelivered(online_only=False)  # a new message of the same push
        assert (again.device_id, again.module_name) == (key.device_id, key.module_name)
        assert again.message_id != key.message_id
        assert second.device_ota.claim([again], "publishing_ms", 30)[0] == [again]
    finally:
        first.close()
        second.close()

