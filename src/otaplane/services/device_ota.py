"""The device side of OTA: which package each device should install now, and what devices say
about it (progress, the version they run).

`push` is what the upgrade-job worker calls. It records the package in `device_ota_pending`
(one row per device and OTA module) and wakes the in-process device channel; a channel in
another process finds the row by polling (`undelivered`). A device that is offline gets the
package when it connects (`offers`), a device that asks (`firmware/get`) gets it as the answer
(`offer`), and the row goes away when the device reports the package's DestVersion for that
module.

Rules and state only: the device channel (otaplane.devices) builds the MQTT payloads.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from otaplane import errors
from otaplane.blobs.chunk_cache import ChunkCache
from otaplane.services import jobs, task_flow
from otaplane.services.devices import DEFAULT_MODULE, DeviceRef, DeviceService
from otaplane.services.firmware import FirmwareService
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store.database import retry_on_deadlock
from otaplane.store import device_ota as store
from otaplane.store.schema import ota_tasks
from otaplane.timefmt import now_ms

log = logging.getLogger("otaplane.device_ota")

UNDELIVERED_BATCH = 2000

# A delivered push goes again when the device reports the version it ran before the task, once
# neither it was pushed nor the device reported progress for this long: not to a device that is
# busy downloading, nor twice to one that connected and reported as the push went out. A report
# within that time schedules the push for its end, when it goes unless the device reported
# progress or took the push (firmware/get) meanwhile. Settings.push_again_quiet_seconds.
PUSH_AGAIN_QUIET_MS = 10_000
# What the device protocol's failure steps mean (`/ota/device/progress`).
FAILURE_STEPS = {-1: "upgrade failed", -2: "download failed", -3: "verify failed", -4: "burn failed"}


@dataclass(frozen=True)
class PackageFile:
    name: str
    size: int
    url: str
    sign: str
    md5: str


@dataclass(frozen=True)
class PendingPackage:
    """A package as one device gets it: what a push or a firmware/get answer carries."""

    device_id: int
    product_key: str
    device_name: str
    module_name: str
    module_is_default: bool
    message_id: int
    firmware_id: str
    version: str
    size: int
    sign_method: str  # Md5 | SHA256
    sign: str | None  # single file: lowercase hex
    md5: str | None  # single file: lowercase hex, whatever the sign method
    url: str | None  # single file: presigned download URL
    files: tuple[PackageFile, ...]  # multi-file packages
    is_diff: bool
    udi: str | None
    progress: int | None
    progress_desc: str | None
    delivered: bool
    mqtt_stream: int | None = None  # DownloadProtocol MQTT: the streamId the device asks blocks of
    # Delivered, and scheduled to go again at this time (a version report in the quiet period,
    # DeviceOtaService.push_due_again); a firmware/get answer before then calls that off.
    push_again_ms: int | None = None


@dataclass(frozen=True)
class VersionReport:
    """`/ota/device/inform`: the device runs `version` for `module` (None = default)."""

    device_id: int
    module: str | None
    version: str


@dataclass(frozen=True)
class ProgressReport:
    """`/ota/device/progress`: a step of -4..-1 (failure) or 0..100 (percent)."""

    device_id: int
    module: str | None
    step: int
    desc: str | None


@dataclass(frozen=True)
class PendingKey:
    """Which push: the device, its module and the push's id (a newer push has another id)."""

    device_id: int
    module_name: str
    message_id: int


@dataclass(frozen=True)
class Pushed:
    device_id: int
    module_name: str
    message_id: int


def new_message_id() -> int:
    """The push's `id`: positive and below 2**31, like the platform's (some SDKs keep it in an int32)."""
    return secrets.randbelow(2**31 - 2) + 1


class DeviceOtaService:
    def __init__(self, db: Database, devices: DeviceService, firmware: FirmwareService, minute_ms: int = 60_000,
                 push_again_quiet_ms: int = PUSH_AGAIN_QUIET_MS):
        self.db = db
        self.devices = devices
        self.firmware = firmware
        self.minute_ms = minute_ms  # a job "minute": task timeouts (shorter in tests)
        self.push_again_quiet_ms = push_again_quiet_ms  # PUSH_AGAIN_QUIET_MS (shorter in tests)
        self._blocks = ChunkCache(firmware.blobs)  # MQTT downloads: 5 KB asks, 64 KB reads
        self._listeners: list[Callable[[int], None]] = []
        self._job_listeners: list[Callable[[], None]] = []

    # --- the in-process channel hears about pushes at once --------------------------------------
    def add_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(device_id)` after each push commits; it must be quick and thread-safe."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # --- push -----------------------------------------------------------------------------------
    def push(self, tenant: Tenant | None, device: DeviceRef, firmware_id: str) -> Pushed:
        """Make `firmware_id` the device's package for its module. `tenant` None: any instance
        (internal callers that already checked ownership)."""
        instance_pk = tenant.instance_pk if tenant is not None else None
        if not device.iot_id and not (device.product_key and device.device_name):
            raise errors.NullDeviceReference()
        with self.db.connect() as conn:
            device_row = store.device_row(conn, instance_pk, device.iot_id, device.product_key, device.device_name)
            if device_row is None:
                raise errors.NotExistedDevice()
            firmware_row = store.firmware_row(conn, instance_pk, firmware_id)
            if firmware_row is None:
                raise errors.FirmwareNotFound()
        return self.push_ids(device_row["id"], firmware_row["id"])

    def push_ids(self, device_id: int, firmware_pk: int) -> Pushed:
        """`push` by row ids (the job worker's form)."""
        return self.push_many(firmware_pk, [device_id])[0]

    def notify_pushed(self, device_ids: Iterable[int]) -> None:
        """Tell the listeners (the in-process device channel) about pushes that just committed."""
        for listener in list(self._listeners):
            for device_id in device_ids:
                try:
                    listener(device_id)
                except Exception:  # a listener's failure must not fail the push: polling still delivers
                    log.exception("push listener failed")

    def push_many(self, firmware_pk: int, device_ids: list[int]) -> list[Pushed]:
        """One package to many devices in one transaction (a job's batch); all or none."""
        pushed: list[Pushed] = []
        try:
            with self.db.write_turn(), self.db.begin() as conn:
                target = store.firmware_target(conn, firmware_pk)
                if target is None:
                    raise errors.FirmwareNotFound()
                products = store.device_products(conn, device_ids)
                now = now_ms()
                rows = []
                for device_id in device_ids:
                    if device_id not in products:
                        raise errors.NotExistedDevice()
                    if products[device_id] != target["product_id"]:
                        raise errors.FirmwareProductMismatch()
                    message_id = new_message_id()
                    rows.append(store.pending_row(device_id, target["module_name"], firmware_pk, message_id, now))
                    pushed.append(Pushed(device_id, target["module_name"], message_id))
                store.upsert_many(conn, rows)
        except IntegrityError:
            # A foreign key: the package (or a device) was deleted after it was read above, by
            # another process (`otaplane devices push` runs beside the server).
            with self.db.connect() as conn:
                if store.firmware_target(conn, firmware_pk) is None:
                    raise errors.FirmwareNotFound() from None
            raise errors.NotExistedDevice() from None
        self.notify_pushed(item.device_id for item in pushed)
        return pushed

    # --- what devices get -----------------------------------------------------------------------
    def offers(self, device_id: int) -> list[PendingPackage]:
        """Every package the device should install now (pushed to it when it connects)."""
        with self.db.connect() as conn:
            rows = store.offers(conn, device_id, pushed_only=True)
            return self._packages(conn, rows)

    def offers_many(self, device_ids: list[int]) -> dict[int, list[PendingPackage]]:
        """`offers` for many devices at once (a burst of CONNECTs)."""
        with self.db.connect() as conn:
            packages = self._packages(conn, store.for_devices(conn, sorted(set(device_ids))))
        found: dict[int, list[PendingPackage]] = {}
        for package in packages:
            found.setdefault(package.device_id, []).append(package)
        return found

    def file_block(self, device_id: int, stream_id: int, file_id: int, offset: int,
                   size: int) -> tuple[int, bytes] | None:
        """DownloadProtocol MQTT: (file length, up to `size` bytes from `offset`) of the file
        `stream_id`/`file_id` (a package of the device's own product, its one file), or None.
        An offset at or past the end gives no bytes."""
        if file_id != 1 or stream_id > 2**31 - 1:
            return None
        with self.db.connect() as conn:
            row = store.stream_file(conn, device_id, stream_id)
        if row is None:
            return None
        data = self._blocks.read(row["blob_key"], offset, size) if offset < row["size"] else b""
        return None if data is None else (row["size"], data)

    def offer(self, device_id: int, module: str | None) -> PendingPackage | None:
        """The answer to the device's firmware/get for one module (None = `default`)."""
        with self.db.connect() as conn:
            rows = store.offers(conn, device_id, module or DEFAULT_MODULE)
            packages = self._packages(conn, rows)
        if not packages:
            return None
        package = packages[0]
        # Asking for it is taking it: the task is NOTIFIED, and a push-again scheduled is off.
        if not package.delivered or package.push_again_ms is not None:
            self.mark_delivered([(package.device_id, package.module_name, package.message_id)])
        return package

    def pushable(self, device_id: int, module: str | None) -> PendingPackage | None:
        """The module's package the device should be pushed again now that it is back (an
        external broker learns that from its version report): as `offers`, not as `offer`
        (nothing the device only gets by asking, no task attempt it already took)."""
        with self.db.connect() as conn:
            rows = store.offers(conn, device_id, module or DEFAULT_MODULE, pushed_only=True)
            packages = self._packages(conn, rows)
        return packages[0] if packages else None

    def undelivered(self, limit: int = UNDELIVERED_BATCH, online_only: bool = True,
                    after: PendingKey | None = None) -> list[PendingKey]:
        """Pushes that no process delivered yet, to devices some process has online, oldest
        first (cheap: every device channel asks several times a second, then loads only the
        packages it can deliver). `online_only=False`: to any device (the external-broker
        channel cannot see connections). A full page (`limit` keys): pass its last key as
        `after` for the next one. A sweep's first page first makes the pushes whose push-again
        is due undelivered (`push_due_again`), so every sweep of every process honours them."""
        if after is None:
            self.push_due_again()
        query = store.undelivered_online if online_only else store.undelivered_any
        position = (after.device_id, after.module_name) if after is not None else None
        with self.db.connect() as conn:
            return [PendingKey(r.device_id, r.module_name, r.message_id) for r in query(conn, limit, position)]

    @retry_on_deadlock
    def push_due_again(self, now: int | None = None, limit: int = UNDELIVERED_BATCH) -> int:
        """Make undelivered the pushes whose push-again is due (a version report asked for it
        within the quiet period, `_version_during_task`): the device channels push them as any
        other. Durable and shared: the time is in the row, so a restart or another replica on the
        same database honours it. How many it made undelivered (the rest, past `limit`, next time)."""
        now = now_ms() if now is None else now
        with self.db.connect() as conn:
            due = store.due_again(conn, now, limit)
        if not due:
            return 0
        with self.db.write_turn(), self.db.begin() as conn:
            return store.push_due_again(conn, [(*key, new_message_id()) for key in due], now)

    def packages(self, keys: Iterable[PendingKey]) -> list[PendingPackage]:
        """The packages of these pushes, for those still pending and not replaced since."""
        wanted = {(k.device_id, k.module_name, k.message_id) for k in keys}
        with self.db.connect() as conn:
            rows = store.for_devices(conn, sorted({k[0] for k in wanted}))
            rows = [r for r in rows if (r["device_id"], r["module_name"], r["message_id"]) in wanted]
            return self._packages(conn, rows)

    @retry_on_deadlock
    def claim(self, keys: Iterable[PendingKey], stamp: str, hold_s: float) -> tuple[list[PendingKey], int]:
        """The pushes this process may publish now, of `keys`: those no other process took for
        the same purpose (`stamp`: "publishing_ms" or "re_offered_ms") within `hold_s`; and the
        stamp written, for `release`. Processes on one external broker all see every push:
        without this each would publish it."""
        now = now_ms()
        items = [(k.device_id, k.module_name, k.message_id) for k in keys]
        with self.db.write_turn(), self.db.begin() as conn:
            claimed = store.claim(conn, items, stamp, now, int(hold_s * 1000))
        return [PendingKey(*item) for item in claimed], now

    def release(self, keys: Iterable[PendingKey], stamp: str, at_ms: int) -> None:
        """Give back claims (`claim`'s stamp `at_ms`) whose publish failed: any process may try
        again at once instead of after the hold."""
        items = [(k.device_id, k.module_name, k.message_id) for k in keys]
        if items:
            with self.db.write_turn(), self.db.begin() as conn:
                store.release(conn, items, stamp, at_ms)

    @retry_on_deadlock
    def mark_delivered(self, items: Iterable[tuple[int, str, int]]) -> None:
        """(device_id, module_name, message_id) of pushes the devices acknowledged."""
        items = sorted(items)  # device order: the lock order of concurrent report batches
        if items:
            now = now_ms()
            with self.db.write_turn(), self.db.begin() as conn:
                task_pks = store.tasks_of_pushes(conn, items)
                store.mark_delivered(conn, items, now)
                if task_pks:
                    task_flow.move(conn, task_pks, task_flow.NOTIFIED, actor="device", now_ms=now,
                                   minute_ms=self.minute_ms)

    def _packages(self, conn, rows) -> list[PendingPackage]:
        files = store.files_of(conn, [r["firmware_pk"] for r in rows if r["blob_key"] is None])
        packages = []
        for row in rows:
            package_files = tuple(
                PackageFile(f["name"], f["size"], self.firmware.download_url(f["blob_key"]), f["sign_value"],
                            f["file_md5"])
                for f in files.get(row["firmware_pk"], [])
            )
            single = row["blob_key"] is not None
            packages.append(PendingPackage(
                device_id=row["device_id"], product_key=row["product_key"], device_name=row["device_name"],
                module_name=row["module_name"], module_is_default=bool(row["module_is_default"]),
                message_id=row["message_id"], firmware_id=row["firmware_id"], version=row["dest_version"],
                size=row["size"], sign_method=row["sign_method"], sign=row["sign"],
                md5=self._md5(row) if single else None,
                url=self.firmware.download_url(row["blob_key"]) if single else None,
                files=package_files, is_diff=row["type"] == 1, udi=row["udi"],
                progress=row["progress"], progress_desc=row["progress_desc"],
                delivered=row["delivered_ms"] is not None, push_again_ms=row["push_again_ms"],
                mqtt_stream=row["firmware_pk"] if single and row["download_protocol"] == "MQTT" else None,
            ))
        return packages

    def _md5(self, row) -> str | None:
        if row["md5"]:
            return row["md5"]
        if row["sign_method"] == "Md5":
            return row["sign"]
        # A SHA256 package created before the md5 column: hash it once and keep the result.
        digest = self.firmware.blobs.digest(row["blob_key"])
        if digest is None:
            return None
        with self.db.begin() as conn:
            store.set_firmware_md5(conn, row["firmware_pk"], digest.md5)
        return digest.md5

    # --- what devices say -----------------------------------------------------------------------
    def version_reported(self, device_id: int, module: str | None, version: str) -> bool:
        """Record the module's version; True when that completes the pending package. Success of
        an upgrade task is decided here, by the DestVersion, not by a progress of 100. A version
        that matches a running dynamic job gives the device a task of it."""
        return self.apply_reports([VersionReport(device_id, module, version)])[0]

    def progress_reported(self, device_id: int, module: str | None, step: int, desc: str | None) -> bool:
        """Record a progress step (-4..-1 failure, 0..100 percent); False when nothing is pending.
        The first step starts the task's timeout; a failure step fails the task with its reason."""
        return self.apply_reports([ProgressReport(device_id, module, step, desc)])[0]

    def apply_reports(self, reports: list["VersionReport | ProgressReport"]) -> list[bool]:
        """Several device reports in one transaction (the device channel's group commit), in
        order. Should one fail, the batch is rolled back and each report runs alone, so a bad
        report costs only itself (its result is then the exception, raised for a single one)."""
        try:
            with self.db.write_turn(), self.db.begin() as conn:
                results, woken = self._apply(conn, reports)
        except Exception:
            if len(reports) == 1:
                raise
            results, woken = [], False
            for report in reports:
                try:
                    with self.db.write_turn(), self.db.begin() as conn:
                        [result], created = self._apply(conn, [report])
                    woken = woken or created
                except Exception as problem:  # noqa: BLE001 - handed back to this report's caller
                    log.exception("device report %s failed", report)
                    result = problem
                results.append(result)
        if woken:
            self._wake_jobs()
        return results

    def _apply(self, conn, reports) -> tuple[list[bool], bool]:
        now = now_ms()
        results: list[bool] = [False] * len(reports)
        created = 0
        # In device order (a device's own reports keep theirs: the sort is stable), so that
        # concurrent batches on PostgreSQL lock push rows in one order, as mark_delivered does.
        for index in sorted(range(len(reports)), key=lambda i: reports[i].device_id):
            report = reports[index]
            if isinstance(report, VersionReport):
                done, new_tasks = self._version(conn, report, now)
                created += new_tasks
            else:
                done = self._progress(conn, report, now)
            results[index] = done
        return results, created > 0

    def _version(self, conn, report: "VersionReport", now: int) -> tuple[bool, int]:
        module_name = report.module or DEFAULT_MODULE
        if not self.devices.record_version(conn, report.device_id, module_name, report.version, now):
            return False, 0  # a module over the device's cap: the report is refused as a whole
        task = store.task_of(conn, report.device_id, module_name)
        if task is not None and task["status"] in task_flow.UNFINISHED:
            self._version_during_task(conn, report, module_name, task, now)
        else:
            self._version_before_push(conn, report, module_name, now)
        completed = store.clear_installed(conn, report.device_id, module_name, report.version) > 0
        created = jobs.dynamic_tasks_for_device(conn, report.device_id, module_name, report.version, now)
        return completed, created

    def _version_during_task(self, conn, report: "VersionReport", module_name: str, task: dict, now: int) -> None:
        """A version report while the device has the task's push, read as the platform does:
        the DestVersion succeeds; the version it ran when the task began means it is not
        upgraded yet (it restarted, lost the push, its download broke), so it is pushed again
        (at the end of the quiet period after the push or its last progress: store.push_again);
        any other version fails the task."""
        if task["dest_version"] == report.version:
            task_flow.move(conn, [task["id"]], task_flow.SUCCEEDED, actor="device", now_ms=now,
                           values={"progress": 100}, minute_ms=self.minute_ms)
        elif task["src_version"] is not None and task["src_version"] != report.version:
            task_flow.move(conn, [task["id"]], task_flow.FAILED, actor="device", now_ms=now,
                           reason="report version is not conform", minute_ms=self.minute_ms)
        elif task["progress"] < 100:
            # At 100 it has the package and is installing (a reconnect before its restart reports
            # the old version): not sent again; a failed install ends at the task's timeout.
            store.push_again(conn, report.device_id, module_name, now, self.push_again_quiet_ms, new_message_id())

    def _version_before_push(self, conn, report: "VersionReport", module_name: str, now: int) -> None:
        """The device reports a package's DestVersion before its task's push (paced, scheduled)
        or while the task waits for a retry: it runs that version, so the task succeeded."""
        task = store.waiting_task(conn, report.device_id, module_name, report.version)
        if task is not None:
            task_flow.stop_retries(conn, ota_tasks.c.id == task["id"])
            task_flow.move(conn, [task["id"]], task_flow.SUCCEEDED, actor="device", now_ms=now,
                           values={"progress": 100}, minute_ms=self.minute_ms)

    def _progress(self, conn, report: "ProgressReport", now: int) -> bool:
        module_name = report.module or DEFAULT_MODULE
        step = report.step
        known, task = store.progress_and_task(conn, report.device_id, module_name, step, report.desc, now)
        if task is None or task["status"] not in task_flow.UNFINISHED or task["status"] == task_flow.CONFIRM:
            return known
        if step < 0:
            reason = report.desc or FAILURE_STEPS.get(step, f"the device reported failure step {step}")
            task_flow.move(conn, [task["id"]], task_flow.FAILED, actor="device", now_ms=now,
                           reason=f"{reason} (step {step})", minute_ms=self.minute_ms)
        elif task["status"] == task_flow.IN_PROGRESS:
            jobs.set_task_progress(conn, task["id"], step, now)
        else:
            deadline = now + task["timeout_minutes"] * self.minute_ms if task["timeout_minutes"] else None
            task_flow.move(conn, [task["id"]], task_flow.IN_PROGRESS, actor="device", now_ms=now,
                           values={"progress": step, "deadline_ms": deadline}, minute_ms=self.minute_ms)
        return known

    # The dispatcher hears about new tasks (a dynamic job matched) through these.
    def add_job_listener(self, listener: Callable[[], None]) -> None:
        self._job_listeners.append(listener)

    def _wake_jobs(self) -> None:
        for listener in list(self._job_listeners):
            listener()
