"""Upgrade jobs: creating them (verify, static, dynamic), reading them, and what an operator does
to their tasks (cancel, confirm, re-upgrade).

A job's tasks are created with it (static and verify jobs, and dynamic jobs with DynamicMode 1
for the devices that match now); the dispatcher (services/dispatcher.py) sends them out at the
job's pace, and device reports move them on (services/device_ota.py). Every state change goes
through task_flow.move.
"""

from __future__ import annotations

import csv
import io
import random
import re
import secrets
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from math import ceil
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from otaplane import errors, ids
from otaplane.blobs import BlobStore, UploadForm
from otaplane.services import task_flow
from otaplane.services.devices import DeviceRef
from otaplane.services.modules import product_row
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store.database import retry_on_deadlock
from otaplane.store import firmware as firmware_store
from otaplane.store import jobs as store
from otaplane.store import uploads as upload_store
from otaplane.store.prepared import Prepared
from otaplane.store.schema import devices, firmware, ota_jobs, ota_modules, ota_tasks, products
from otaplane.timefmt import now_ms

VERIFY = task_flow.VERIFY_JOB
UPGRADE = "UPGRADE_FIRMWARE"
STATIC = "STATIC"
DYNAMIC = "DYNAMIC"
PLANNED, IN_PROGRESS, COMPLETED, CANCELED = "PLANNED", "IN_PROGRESS", "COMPLETED", "CANCELED"

MAX_VERIFY_DEVICES = 10
MAX_SPECIFIC_DEVICES = 200
MAX_LIST_FILE_DEVICES = 10_000
MAX_LIST_FILE_BYTES = 5 * 1024 * 1024
LIST_UPLOAD_TTL_S = 60
DEFAULT_PER_MINUTE = 10_000


@dataclass(frozen=True)
class Tag:
    key: str
    value: str


MAX_MQTT_DOWNLOAD_BYTES = 16 * 1024 * 1024


def pace_interval_us(max_per_minute: int) -> float:
    """Time between two pushes of a job paced at `max_per_minute` (the dispatcher's pace)."""
    return 60_000_000 / max(1, max_per_minute)


@dataclass(frozen=True)
class JobSpec:
    """What CreateOTA*Job asked for, already parsed and range-checked by the action table."""

    firmware_id: str
    product_key: str
    job_type: str = UPGRADE
    selection_type: str = STATIC
    target_selection: str = "ALL"
    device_names: list[str] = field(default_factory=list)
    device_list_url: str | None = None
    gray_percent: str | None = None
    src_versions: list[str] = field(default_factory=list)
    dynamic_mode: int | None = None
    schedule_ms: int | None = None
    schedule_finish_ms: int | None = None
    max_per_minute: int = DEFAULT_PER_MINUTE
    timeout_minutes: int | None = None
    retry_count: int | None = None
    retry_interval: int | None = None
    overwrite_mode: int = 1
    need_push: bool = True
    need_confirm: bool = False
    multi_module: bool = False
    download_protocol: str = "HTTPS"
    tags: list[Tag] = field(default_factory=list)
    abort_failure_percent: float | None = None
    abort_minimum_count: int | None = None


@dataclass(frozen=True)
class Page:
    current_page: int
    page_size: int
    total: int
    items: list[Any]

    @property
    def page_count(self) -> int:
        return ceil(self.total / self.page_size) if self.page_size else 0


@dataclass(frozen=True)
class Target:
    device_id: int
    device_name: str
    version: str | None


def new_job_id() -> str:
    return ids.random_alnum(20) + "0200"  # platform JobIds are 24 letters/digits


def new_task_id() -> str:
    return ids.random_alnum(20) + "0300"


def gray_count(candidates: int, percent: str) -> int:
    """GrayPercent of the candidates, rounded down, but at least one device."""
    share = (Decimal(candidates) * Decimal(percent) / 100).to_integral_value(rounding=ROUND_DOWN)
    return max(1, min(candidates, int(share))) if candidates else 0


# The platform's format ("33.33"): Decimal() would also read 1e1, " 5", +5, 5., .5, 1_0, nan,
# inf and other scripts' digits, and the raw text is what QueryOTAJob gives back.
_GRAY_PERCENT = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_gray_percent(raw: str) -> str:
    if not _GRAY_PERCENT.fullmatch(raw):
        raise errors.invalid("GrayPercent", "must be a number such as 33.33")
    value = Decimal(raw)
    if value <= 0 or value > 100 or -value.as_tuple().exponent > 3:
        raise errors.invalid("GrayPercent", "must be above 0 and at most 100, with at most 3 decimals")
    return raw


class JobService:
    def __init__(self, db: Database, blobs: BlobStore, minute_ms: int = 60_000):
        self.db = db
        self.blobs = blobs
        self.minute_ms = minute_ms  # a job "minute" (timeouts, retries, schedule limits); shorter in tests
        self._listeners: list = []

    def add_listener(self, listener) -> None:
        """`listener()` after a change the dispatcher should look at soon (a new job ...)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # --- creating -------------------------------------------------------------------------------
    @retry_on_deadlock
    def create(self, tenant: Tenant, spec: JobSpec) -> tuple[str, int]:
        """Create the job and its first tasks in one transaction; returns (JobId, created_ms)."""
        now = now_ms()
        self._check_times(spec, now)
        names = self._list_file_names(tenant, spec.device_list_url) if spec.device_list_url else spec.device_names
        try:
            with self.db.write_turn(), self.db.begin() as conn:
                fw = self._firmware(conn, tenant, spec)
                self._check_firmware_state(conn, spec, fw)
                targets = self._targets(conn, spec, fw, names)
                job_id = new_job_id()
                planned = spec.schedule_ms is not None and spec.schedule_ms > now
                job_pk = store.insert_job(conn, self._job_values(tenant, spec, fw, job_id, planned, now))
                self._create_tasks(conn, job_pk, spec, fw["module_name"], targets, now,
                                   actor=f"api:{self._action(spec)}")
                if spec.job_type == VERIFY:
                    task_flow.refresh_verification(conn, [job_pk], now)
        except IntegrityError:
            # The package deleted meanwhile (the job's foreign key; its deletion holds the row
            # from before its checks, so the job waited and then found it gone)...
            with self.db.connect() as conn:
                self._firmware(conn, tenant, spec)
            # ...or the unique index on unfinished tasks: another job took a device between our
            # check and our insert.
            raise errors.DeviceHasUnfinishedTask(device="one of the devices", job="another job") from None
        self._notify()
        return job_id, now

    @staticmethod
    def _action(spec: JobSpec) -> str:
        if spec.job_type == VERIFY:
            return "CreateOTAVerifyJob"
        return "CreateOTADynamicUpgradeJob" if spec.selection_type == DYNAMIC else "CreateOTAStaticUpgradeJob"

    def _check_times(self, spec: JobSpec, now: int) -> None:
        minute = self.minute_ms
        if spec.schedule_ms is not None:
            if not now + 5 * minute <= spec.schedule_ms <= now + 7 * 24 * 60 * minute:
                raise errors.invalid("ScheduleTime", "must be between 5 minutes and 7 days from now (ms since epoch)")
        if spec.schedule_finish_ms is not None:
            start = spec.schedule_ms or now
            if not start + 60 * minute <= spec.schedule_finish_ms <= start + 30 * 24 * 60 * minute:
                raise errors.invalid("ScheduleFinishTime",
                                     "must be between 1 hour and 30 days after ScheduleTime (or now)")
        if spec.retry_interval is not None and spec.retry_count is None:
            raise errors.missing("RetryCount")
        if spec.retry_count is not None and spec.retry_interval is None:
            raise errors.missing("RetryInterval")
        if spec.retry_interval and spec.timeout_minutes and spec.retry_interval >= spec.timeout_minutes:
            raise errors.invalid("RetryInterval", "must be shorter than TimeoutInMinutes")
        if spec.multi_module and spec.overwrite_mode == 2:
            raise errors.invalid("MultiModuleMode", "cannot be used with OverwriteMode 2")
        if spec.target_selection == "GROUP":
            raise errors.GroupTargetNotSupported()
        tag_bytes = sum(len(t.key) + len(t.value) for t in spec.tags)
        if tag_bytes > 4096:
            raise errors.invalid("Tag", "keys and values together must be at most 4096 characters")
        if len({t.key for t in spec.tags}) != len(spec.tags):
            raise errors.invalid("Tag", "keys must be unique")

    def _firmware(self, conn, tenant: Tenant, spec: JobSpec):
        product_row(conn, tenant, spec.product_key)  # someone else's product looks like a missing one
        row = conn.execute(
            sa.select(firmware.c.id, firmware.c.status, firmware.c.dest_version, firmware.c.src_version,
                      firmware.c.type, firmware.c.product_id, firmware.c.name, firmware.c.blob_key, firmware.c.size,
                      ota_modules.c.module_name, products.c.product_key)
            .join(ota_modules, ota_modules.c.id == firmware.c.module_id)
            .join(products, products.c.id == firmware.c.product_id)
            .where(firmware.c.firmware_id == spec.firmware_id, firmware.c.instance_pk == tenant.instance_pk)
        ).first()
        if row is None:
            raise errors.FirmwareNotFound()
        if row.product_key != spec.product_key:
            raise errors.FirmwareProductMismatch()
        return row._mapping

    def _check_firmware_state(self, conn, spec: JobSpec, fw) -> None:
        if spec.download_protocol == "MQTT" and (fw["blob_key"] is None or fw["size"] > MAX_MQTT_DOWNLOAD_BYTES):
            # As on the platform: blocks over MQTT are for small single-file packages.
            raise errors.invalid("DownloadProtocol", f"MQTT download takes single-file packages of at most "
                                                     f"{MAX_MQTT_DOWNLOAD_BYTES // (1024 * 1024)} MB")
        status = fw["status"]
        if spec.job_type == VERIFY:
            if status == task_flow.FIRMWARE_VERIFYING:
                raise errors.FirmwareVerifying()
            if status == task_flow.FIRMWARE_VERIFIED:
                raise errors.FirmwareAlreadyVerified()
            if status == -1:
                raise errors.FirmwareNeedsNoVerification()
            return
        if status not in (-1, task_flow.FIRMWARE_VERIFIED):
            raise errors.FirmwareNotVerified()
        if spec.selection_type == DYNAMIC and store.running_jobs_of_firmware(conn, fw["id"], DYNAMIC):
            raise errors.DynamicJobExists()

    def _targets(self, conn, spec: JobSpec, fw, names: list[str]) -> list[Target]:
        module = fw["module_name"]
        if spec.job_type == VERIFY or spec.target_selection == "SPECIFIC":
            unique = list(dict.fromkeys(names))
            if len(unique) != len(names):
                raise errors.invalid("TargetDeviceName", "device names must be unique")
            rows = {r["device_name"]: r for r in store.devices_by_name(conn, fw["product_id"], module, unique)}
            missing = [n for n in unique if n not in rows]
            if missing:
                raise errors.DevicesNotFound(count=len(missing), names=", ".join(missing[:5]))
            return [Target(rows[n]["id"], n, rows[n]["version"]) for n in unique]
        if spec.selection_type == DYNAMIC and spec.dynamic_mode == 2:
            return []  # only devices that report a matching version from now on
        wanted = set(spec.src_versions)
        if fw["type"] == 1 and fw["src_version"]:  # a diff package applies to one version only
            if wanted and fw["src_version"] not in wanted:  # an empty intersection meant "no filter"
                raise errors.invalid("SrcVersion", f"a diff package upgrades devices on {fw['src_version']} "
                                     "only; the list leaves it out")
            wanted = {fw["src_version"]}
        targets = [
            Target(r["id"], r["device_name"], r["version"])
            for r in store.product_devices(conn, fw["product_id"], module)
            if r["version"] != fw["dest_version"] and (not wanted or r["version"] in wanted)
        ]
        if spec.target_selection == "GRAY":
            targets = random.sample(targets, gray_count(len(targets), spec.gray_percent or "0"))
            targets.sort(key=lambda t: t.device_id)
        if not targets and spec.selection_type == STATIC:
            raise errors.NoDeviceToUpgrade()
        return targets

    def _job_values(self, tenant: Tenant, spec: JobSpec, fw, job_id: str, planned: bool, now: int) -> dict:
        return {
            "job_id": job_id, "instance_pk": tenant.instance_pk, "firmware_pk": fw["id"],
            "product_id": fw["product_id"], "module_name": fw["module_name"], "job_type": spec.job_type,
            "selection_type": spec.selection_type,
            "target_selection": "ALL" if spec.selection_type == DYNAMIC else spec.target_selection,
            "gray_percent": spec.gray_percent, "dynamic_mode": spec.dynamic_mode,
            "status": PLANNED if planned else IN_PROGRESS, "description": None,
            "src_versions": list(spec.src_versions), "tags": [{"Key": t.key, "Value": t.value} for t in spec.tags],
            "schedule_ms": spec.schedule_ms, "schedule_finish_ms": spec.schedule_finish_ms,
            "max_per_minute": spec.max_per_minute, "timeout_minutes": spec.timeout_minutes,
            "retry_count": spec.retry_count, "retry_interval": spec.retry_interval,
            "overwrite_mode": spec.overwrite_mode, "need_push": spec.need_push, "need_confirm": spec.need_confirm,
            "multi_module": spec.multi_module, "download_protocol": spec.download_protocol,
            "abort_failure_percent": spec.abort_failure_percent, "abort_minimum_count": spec.abort_minimum_count,
            "pace_next_us": now * 1000, "created_ms": now, "modified_ms": now,
            "started_ms": None if planned else now, "ended_ms": None,
        }

    def _create_tasks(self, conn, job_pk: int, spec: JobSpec, module: str, targets: list[Target], now: int,
                      actor: str) -> list[int]:
        """Tasks for the targets. A device busy with an unfinished task (of any module, unless both
        jobs have MultiModuleMode: store.unfinished_by_device) keeps it and gets a FAILED task
        here (OverwriteMode 1), or loses it (2). A verify job refuses such devices instead: a
        verification must run on every device it names."""
        busy = store.unfinished_by_device(conn, [t.device_id for t in targets], module, spec.multi_module)
        if busy and spec.selection_type == DYNAMIC and spec.overwrite_mode != 2:
            # Skipped, not failed, as when a busy device reports a matching version later
            # (dynamic_tasks_for_device): a failed task would keep it out of this job for good.
            targets = [t for t in targets if t.device_id not in busy]
            busy = {}
        if busy and spec.job_type == VERIFY:
            first = next(t for t in targets if t.device_id in busy)
            raise errors.DeviceHasUnfinishedTask(device=first.device_name, job=busy[first.device_id][0]["job_id"])
        if busy and spec.overwrite_mode == 2:
            task_flow.move(conn, [b["id"] for tasks in busy.values() for b in tasks], task_flow.CANCELED,
                           actor=actor, now_ms=now, reason="overwritten by a newer job", minute_ms=self.minute_ms)
            busy = {}
        first_status = task_flow.CONFIRM if spec.need_confirm else task_flow.QUEUED
        due = spec.schedule_ms if spec.schedule_ms and spec.schedule_ms > now else now
        rows = []
        for target in targets:
            refused = busy[target.device_id][0] if target.device_id in busy else None
            rows.append({
                "task_id": new_task_id(), "job_pk": job_pk, "device_id": target.device_id, "module_name": module,
                "status": task_flow.FAILED if refused else first_status, "src_version": target.version,
                "progress": 0,
                "description": f"device has an unfinished task in job {refused['job_id']}" if refused else None,
                "attempt": 1, "dispatched_attempt": 0, "message_id": None,
                "retries_left": 0 if refused else (spec.retry_count or 0),
                "due_ms": None if refused else due, "deadline_ms": None, "created_ms": now, "modified_ms": now,
            })
        task_pks = store.insert_tasks(conn, rows)
        by_status: dict[str, list[int]] = {}
        for row, pk in zip(rows, task_pks):
            by_status.setdefault(row["status"], []).append(pk)
        task_flow.record_created(conn, by_status, actor=actor, now_ms=now)
        return task_pks

    def _list_file_names(self, tenant: Tenant, url: str) -> list[str]:
        key = self.blobs.key_from_url(url)
        with self.db.connect() as conn:
            if key is None or not key.startswith(f"ota/{tenant.instance_id}/dnlist/") or \
                    not upload_store.owned_by(conn, key, tenant.instance_pk):
                raise errors.DeviceListUrlInvalid(url=url)
        try:
            data = self.blobs.read(key, MAX_LIST_FILE_BYTES)
        except ValueError:
            raise errors.DeviceListFileInvalid(reason=f"it is larger than {MAX_LIST_FILE_BYTES} bytes") from None
        if data is None:
            raise errors.DeviceListFileNotFound(url=url)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise errors.DeviceListFileInvalid(reason="it is not UTF-8 text") from None
        names = [row[0].strip() for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
        if names and names[0].lower() in ("devicename", "device_name"):
            names = names[1:]  # a header line
        if not names:
            raise errors.DeviceListFileInvalid(reason="it names no device")
        if len(names) > MAX_LIST_FILE_DEVICES:
            raise errors.DeviceListFileInvalid(reason=f"it names {len(names)} devices; at most "
                                                      f"{MAX_LIST_FILE_DEVICES} are allowed")
        return list(dict.fromkeys(names))

    def new_device_list_upload(self, tenant: Tenant) -> tuple[UploadForm, int]:
        """GenerateDeviceNameListURL: an upload slot for a CSV of device names."""
        key = f"ota/{tenant.instance_id}/dnlist/{secrets.token_hex(12)}.csv"
        now = now_ms()
        form = self.blobs.upload_form(key, MAX_LIST_FILE_BYTES, LIST_UPLOAD_TTL_S)
        with self.db.begin() as conn:
            upload_store.record(conn, key, tenant.instance_pk, now)
        return form, now

    # --- reading --------------------------------------------------------------------------------
    def get(self, tenant: Tenant, job_id: str):
        with self.db.connect() as conn:
            row = store.job(conn, tenant.instance_pk, job_id)
        if row is None:
            raise errors.JobNotFound()
        return row

    def page_by_firmware(self, tenant: Tenant, firmware_id: str, current_page: int, page_size: int) -> Page:
        with self.db.connect() as conn:
            fw = firmware_store.get(conn, tenant.instance_pk, firmware_id)
            if fw is None:
                raise errors.FirmwareNotFound()
            total, rows = store.jobs_page(conn, ota_jobs.c.firmware_pk == fw["id"],
                                          (current_page - 1) * page_size, page_size)
        return Page(current_page, page_size, total, rows)

    def page_by_device(self, tenant: Tenant, firmware_id: str, product_key: str, device_name: str,
                       current_page: int, page_size: int) -> Page:
        with self.db.connect() as conn:
            fw = firmware_store.get(conn, tenant.instance_pk, firmware_id)
            if fw is None:
                raise errors.FirmwareNotFound()
            product_row(conn, tenant, product_key)
            device_id = self._device_id(conn, tenant, DeviceRef(None, product_key, device_name))
            has_device = sa.select(ota_tasks.c.job_pk).where(ota_tasks.c.device_id == device_id)
            total, rows = store.jobs_page(conn, sa.and_(ota_jobs.c.firmware_pk == fw["id"],
                                                        ota_jobs.c.id.in_(has_device)),
                                          (current_page - 1) * page_size, page_size)
        return Page(current_page, page_size, total, rows)

    def tasks_page(self, tenant: Tenant, job_id: str, current_page: int, page_size: int,
                   status: str | None, device_names: list[str] | None) -> Page:
        with self.db.connect() as conn:
            job = store.job(conn, tenant.instance_pk, job_id)
            if job is None:
                raise errors.JobNotFound()
            total, rows = store.tasks_page(conn, job["id"], [status] if status else None, device_names,
                                           (current_page - 1) * page_size, page_size)
        return Page(current_page, page_size, total, rows)

    def unfinished_tasks(self, tenant: Tenant, ref: DeviceRef, module: str | None, statuses: list[str]):
        with self.db.connect() as conn:
            device_id = self._device_id(conn, tenant, ref)
            return store.device_unfinished_tasks(conn, device_id, module, statuses or list(task_flow.UNFINISHED))

    def _device_id(self, conn, tenant: Tenant, ref: DeviceRef) -> int:
        query = sa.select(devices.c.id).join(products, products.c.id == devices.c.product_id).where(
            products.c.instance_pk == tenant.instance_pk)
        if ref.iot_id:
            query = query.where(devices.c.iot_id == ref.iot_id)
        elif ref.product_key and ref.device_name:
            query = query.where(products.c.product_key == ref.product_key, devices.c.device_name == ref.device_name)
        else:
            raise errors.NullDeviceReference()
        device_id = conn.execute(query).scalar()
        if device_id is None:
            raise errors.NotExistedDevice()
        return device_id

    # --- changing -------------------------------------------------------------------------------
    @retry_on_deadlock
    def update(self, tenant: Tenant, job_id: str, max_per_minute: int, target_selection: str, upgrade_type: str,
               timeout_minutes: int | None, src_versions: list[str] | None, tags: list[Tag] | None) -> None:
        with self.db.write_turn(), self.db.begin() as conn:
            job = store.job(conn, tenant.instance_pk, job_id)
            if job is None:
                raise errors.JobNotFound()
            if job["status"] in (COMPLETED, CANCELED):
                raise errors.JobFinished(status=job["status"])
            if upgrade_type.upper() != job["selection_type"]:
                raise errors.invalid("UpgradeType", f"this job is {job['selection_type']}")
            if target_selection.upper() != job["target_selection"]:
                raise errors.invalid("TargetSelection", f"this job targets {job['target_selection']}")
            now = now_ms()
            values: dict[str, Any] = {"max_per_minute": max_per_minute, "modified_ms": now}
            if job["pace_next_us"] > now * 1000:
                # The next pace slot was reserved at the old rate: move it to the new one at once
                # (a job slowed to 10/min would otherwise keep a 6 s wait after speeding up).
                values["pace_next_us"] = int(job["pace_next_us"] - pace_interval_us(job["max_per_minute"])
                                             + pace_interval_us(max_per_minute))
            if timeout_minutes is not None:
                values["timeout_minutes"] = timeout_minutes
            if src_versions:
                values["src_versions"] = list(dict.fromkeys(src_versions))
            if tags is not None:
                values["tags"] = [{"Key": t.key, "Value": t.value} for t in tags]
            store.update_job(conn, job["id"], values)
        self._notify()

    @retry_on_deadlock
    def cancel_strategy(self, tenant: Tenant, job_id: str) -> None:
        """CancelOTAStrategyByJob: a dynamic job stops taking new devices (its tasks go on)."""
        with self.db.write_turn(), self.db.begin() as conn:
            job = store.job(conn, tenant.instance_pk, job_id)
            if job is None:
                raise errors.JobNotFound()
            if job["selection_type"] != DYNAMIC:
                raise errors.NotDynamicJob()
            if job["status"] in (COMPLETED, CANCELED):
                raise errors.JobFinished(status=job["status"])
            now = now_ms()
            store.update_job(conn, job["id"], {"status": CANCELED, "ended_ms": now, "modified_ms": now})

    @retry_on_deadlock
    def cancel_by_job(self, tenant: Tenant, job_id: str, *, scheduled: bool, queued: bool, in_progress: bool,
                      notified: bool, unconfirmed: bool | None) -> int:
        """CancelOTATaskByJob. QUEUED also takes CONFIRM tasks unless CancelUnconfirmedTask was
        given as false. Scheduled = the tasks of a job still PLANNED."""
        with self.db.write_turn(), self.db.begin() as conn:
            job = store.job(conn, tenant.instance_pk, job_id)
            if job is None:
                raise errors.JobNotFound()
            if not (scheduled or queued or in_progress or notified or unconfirmed):
                raise errors.CancelFlagRequired()
            statuses: set[str] = set()
            planned = job["status"] == PLANNED
            if scheduled and planned:
                statuses |= {task_flow.QUEUED, task_flow.CONFIRM}
            if queued and not planned:
                statuses.add(task_flow.QUEUED)
                if unconfirmed is None:
                    statuses.add(task_flow.CONFIRM)
            if unconfirmed and not planned:
                statuses.add(task_flow.CONFIRM)
            if notified:
                statuses.add(task_flow.NOTIFIED)
            if in_progress:
                statuses.add(task_flow.IN_PROGRESS)
            task_pks = store.task_ids_of_job(conn, job["id"], statuses)
            moved = task_flow.move(conn, task_pks, task_flow.CANCELED, actor="api:CancelOTATaskByJob",
                                   now_ms=now_ms(), reason="cancelled by job", minute_ms=self.minute_ms)
            if task_flow.QUEUED in statuses:  # a failed task waiting for its retry would be queued again
                task_flow.stop_retries(conn, ota_tasks.c.job_pk == job["id"])
        self._notify()
        return len(moved)

    @retry_on_deadlock
    def cancel_by_device(self, tenant: Tenant, product_key: str, firmware_id: str, device_names: list[str],
                         job_id: str | None) -> int:
        with self.db.write_turn(), self.db.begin() as conn:
            fw = firmware_store.get(conn, tenant.instance_pk, firmware_id)
            if fw is None:
                raise errors.FirmwareNotFound()
            product = product_row(conn, tenant, product_key)
            found = {r["device_name"]: r["id"] for r in store.devices_by_name(conn, product["id"], "default",
                                                                              device_names)}
            missing = [n for n in device_names if n not in found]
            if missing:
                raise errors.DevicesNotFound(count=len(missing), names=", ".join(missing[:5]))
            condition = [ota_jobs.c.firmware_pk == fw["id"], ota_tasks.c.device_id.in_(list(found.values())),
                         ota_tasks.c.status.in_(task_flow.UNFINISHED)]
            if job_id:
                job = store.job(conn, tenant.instance_pk, job_id)
                if job is None:
                    raise errors.JobNotFound()
                condition.append(ota_tasks.c.job_pk == job["id"])
            task_pks = conn.execute(sa.select(ota_tasks.c.id).join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
                                    .where(*condition)).scalars().all()
            moved = task_flow.move(conn, task_pks, task_flow.CANCELED, actor="api:CancelOTATaskByDevice",
                                   now_ms=now_ms(), reason="cancelled by device", minute_ms=self.minute_ms)
            jobs = [job["id"]] if job_id else sa.select(ota_jobs.c.id).where(ota_jobs.c.firmware_pk == fw["id"])
            task_flow.stop_retries(conn, ota_tasks.c.device_id.in_(list(found.values())), ota_tasks.c.job_pk.in_(jobs))
        self._notify()
        return len(moved)

    @retry_on_deadlock
    def make_way_for_push(self, tenant: Tenant, ref: DeviceRef, firmware_id: str, *, cancel: bool) -> list:
        """Before `otaplane devices push` replaces the device's push for the package's module: the
        tasks that push belongs to (store.tasks_owning_push), which would otherwise wait for good
        for reports about a package the device no longer gets, and block its later jobs. Returns
        them as they were; with `cancel`, they are cancelled (a retry waiting is called off)."""
        now = now_ms()
        with self.db.write_turn(), self.db.begin() as conn:
            device_id = self._device_id(conn, tenant, ref)
            fw = firmware_store.get(conn, tenant.instance_pk, firmware_id)
            if fw is None:
                raise errors.FirmwareNotFound()
            product_id = conn.execute(sa.select(devices.c.product_id).where(devices.c.id == device_id)).scalar_one()
            if fw["product_id"] != product_id:  # the push would be refused: cancel nothing
                raise errors.FirmwareProductMismatch()
            tasks = store.tasks_owning_push(conn, device_id, fw["module_name"])
            if cancel and tasks:
                task_pks = [t["id"] for t in tasks]
                task_flow.move(conn, task_pks, task_flow.CANCELED, actor="cli:devices push", now_ms=now,
                               reason="replaced by a push from the CLI", minute_ms=self.minute_ms)
                task_flow.stop_retries(conn, ota_tasks.c.id.in_(task_pks))
        if cancel and tasks:
            self._notify()
        return tasks

    @retry_on_deadlock
    def confirm(self, tenant: Tenant, task_ids: list[str]) -> int:
        with self.db.write_turn(), self.db.begin() as conn:
            tasks = self._tasks(conn, tenant, task_ids)
            moved = task_flow.move(conn, [t["id"] for t in tasks if t["status"] == task_flow.CONFIRM],
                                   task_flow.QUEUED, actor="api:ConfirmOTATask", now_ms=now_ms(),
                                   values={"due_ms": now_ms()}, minute_ms=self.minute_ms)
        self._notify()
        return len(moved)

    @retry_on_deadlock
    def reupgrade(self, tenant: Tenant, job_id: str, task_ids: list[str]) -> int:
        """ReupgradeOTATask: FAILED/CANCELED tasks run again (as a new attempt); a job that
        needs confirmation waits for it again. A finished job goes back to IN_PROGRESS."""
        now = now_ms()
        with self.db.write_turn(), self.db.begin() as conn:
            job = store.job(conn, tenant.instance_pk, job_id)
            if job is None:
                raise errors.JobNotFound()
            tasks = [t for t in self._tasks(conn, tenant, task_ids) if t["job_id"] == job_id]
            if len(tasks) != len(set(task_ids)):
                raise errors.TaskNotFound()
            wrong = [t["task_id"] for t in tasks if t["status"] not in (task_flow.FAILED, task_flow.CANCELED)]
            if wrong:
                raise errors.TaskNotReupgradable(task=wrong[0])
            if job["schedule_finish_ms"] is not None and job["schedule_finish_ms"] <= now:
                # Its window is over: the dispatcher would cancel the task as soon as it was pushed.
                raise errors.JobFinished(status=f"past its ScheduleFinishTime ({job['status']})")
            busy = store.unfinished_by_device(conn, [t["device_id"] for t in tasks], job["module_name"],
                                              job["multi_module"])
            if busy:
                raise errors.DeviceHasUnfinishedTask(device="a device of these tasks",
                                                     job=next(iter(busy.values()))[0]["job_id"])
            to = task_flow.CONFIRM if job["need_confirm"] else task_flow.QUEUED
            moved = task_flow.move(
                conn, [t["id"] for t in tasks], to, actor="api:ReupgradeOTATask", now_ms=now,
                reason="re-upgrade", minute_ms=self.minute_ms,
                values={"attempt": ota_tasks.c.attempt + 1, "due_ms": now, "progress": 0,
                        "retries_left": job["retry_count"] or 0, "deadline_ms": None},
            )
            if job["status"] in (COMPLETED, CANCELED) and job["selection_type"] == STATIC:
                store.update_job(conn, job["id"], {"status": IN_PROGRESS, "ended_ms": None, "modified_ms": now})
            task_flow.refresh_verification(conn, [job["id"]], now)
        self._notify()
        return len(moved)

    def _tasks(self, conn, tenant: Tenant, task_ids: list[str]):
        tasks = store.tasks_by_ids(conn, tenant.instance_pk, list(dict.fromkeys(task_ids)))
        if len(tasks) != len(set(task_ids)):
            raise errors.TaskNotFound()
        return tasks


# --- called from device reports (services/device_ota.py), inside its transaction -------------
# Forward only, in the statement itself: replicas behind a shared subscription may apply one
# device's steps out of order (90 after 100), and the "not conform" check needs the 100.
_SET_PROGRESS = Prepared(
    sa.update(ota_tasks)
    .where(ota_tasks.c.id == sa.bindparam("p_task"), ota_tasks.c.status == sa.bindparam("p_status"),
           sa.or_(ota_tasks.c.progress.is_(None), ota_tasks.c.progress <= sa.bindparam("p_step")))
    .values(progress=sa.bindparam("p_step"), modified_ms=sa.bindparam("p_now"))
)


def set_task_progress(conn, task_pk: int, step: int, now: int) -> None:
    """A progress step of a task already IN_PROGRESS: a value, not a state change, and never
    backwards within an attempt (inside a transaction begun on `conn`; a prepared statement: it
    runs for every progress report)."""
    _SET_PROGRESS.rowcount(conn, p_task=task_pk, p_status=task_flow.IN_PROGRESS, p_step=step, p_now=now)


# Every version report asks this: a prepared statement (store/prepared.py).
_RUNNING_DYNAMIC_JOBS = Prepared(
    sa.select(ota_jobs.c.id, ota_jobs.c.src_versions, ota_jobs.c.overwrite_mode, ota_jobs.c.need_confirm,
              ota_jobs.c.retry_count, ota_jobs.c.job_id, ota_jobs.c.multi_module, firmware.c.dest_version,
              firmware.c.type.label("firmware_type"), firmware.c.src_version.label("diff_base"))
    .join(firmware, firmware.c.id == ota_jobs.c.firmware_pk)
    .join(devices, devices.c.product_id == ota_jobs.c.product_id)
    .where(devices.c.id == sa.bindparam("p_device"), ota_jobs.c.status == sa.bindparam("p_status"),
           ota_jobs.c.selection_type == sa.bindparam("p_selection"), ota_jobs.c.module_name == sa.bindparam("p_module"))
    .order_by(ota_jobs.c.id)
)


def dynamic_tasks_for_device(conn, device_id: int, module: str, version: str, now: int) -> int:
    """Tasks of running dynamic jobs whose SrcVersion list has the version the device just
    reported: one per job and device, ever (a device that failed one is not retried by its
    reports; ReupgradeOTATask is). A device busy with another task is skipped this time under
    OverwriteMode 1 (its next report may match again), or has that task cancelled under 2."""
    running = _RUNNING_DYNAMIC_JOBS.all(conn, p_device=device_id, p_status=IN_PROGRESS, p_selection=DYNAMIC,
                                        p_module=module)
    created = 0
    for job in running:
        if version == job["dest_version"] or version not in (job["src_versions"] or []):
            continue
        if job["firmware_type"] == 1 and job["diff_base"] and version != job["diff_base"]:
            continue  # a diff package applies to its base version only
        job = SimpleNamespace(**job)
        if store.job_has_device(conn, job.id, device_id):
            continue
        busy = store.unfinished_by_device(conn, [device_id], module, job.multi_module).get(device_id)
        if busy:
            if job.overwrite_mode != 2:
                continue
            task_flow.move(conn, [b["id"] for b in busy], task_flow.CANCELED, actor="dispatcher", now_ms=now,
                           reason=f"overwritten by dynamic job {job.job_id}")
        status = task_flow.CONFIRM if job.need_confirm else task_flow.QUEUED
        [task_pk] = store.insert_tasks(conn, [{
            "task_id": new_task_id(), "job_pk": job.id, "device_id": device_id, "module_name": module,
            "status": status, "src_version": version, "progress": 0, "description": None, "attempt": 1,
            "dispatched_attempt": 0, "message_id": None, "retries_left": job.retry_count or 0, "due_ms": now,
            "deadline_ms": None, "created_ms": now, "modified_ms": now,
        }])
        task_flow.record_created(conn, {status: [task_pk]}, actor="dispatcher", now_ms=now,
                                 reason=f"reported version {version}")
        created += 1
        break  # one unfinished task per module
    return created
