"""The device registry: registration (single and batch), lookup, state, reported versions."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from math import ceil

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from otaplane import errors, ids
from otaplane.secretbox import SecretBox
from otaplane.services import task_flow
from otaplane.services.modules import MAX_CUSTOM_MODULES, product_row
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store import devices as store
from otaplane.store import jobs as job_store
from otaplane.timefmt import now_ms

DEVICE_NAME = re.compile(r"[A-Za-z0-9_\-@.:]{4,32}")
MAX_DEVICES_PER_PRODUCT = 1_000_000
DEFAULT_MODULE = "default"
# Distinct module names kept per device. A product has `default` and at most MAX_CUSTOM_MODULES
# others at a time; twice that leaves room for modules deleted and created anew over a device's
# life, and a device that reports made-up names cannot grow device_modules without bound.
MAX_MODULES_PER_DEVICE = 2 * (1 + MAX_CUSTOM_MODULES)
# Devices whose refused reports were logged (one line per device, not one per message); past this
# many the memory starts over.
MODULE_CAP_WARNED_MAX = 10_000

log = logging.getLogger("otaplane.devices")


@dataclass(frozen=True)
class DeviceRef:
    """How a request names a device: IotId wins over ProductKey + DeviceName."""

    iot_id: str | None = None
    product_key: str | None = None
    device_name: str | None = None


@dataclass(frozen=True)
class Device:
    iot_id: str
    product_key: str
    product_name: str
    device_name: str
    device_secret: str
    nickname: str | None
    node_type: int
    status: str  # ONLINE | OFFLINE | UNACTIVE | DISABLE
    firmware_version: str | None
    ip_address: str | None
    created_ms: int
    modified_ms: int
    active_ms: int | None
    online_ms: int | None
    last_seen_ms: int | None


@dataclass(frozen=True)
class DevicePage:
    current_page: int
    page_size: int
    total: int
    items: list[Device]

    @property
    def page_count(self) -> int:
        return ceil(self.total / self.page_size)


@dataclass(frozen=True)
class ModuleVersion:
    module_name: str
    version: str


def status_of(row) -> str:
    if row["disabled"]:
        return "DISABLE"
    if row["active_ms"] is None:
        return "UNACTIVE"
    return "ONLINE" if row["online"] else "OFFLINE"


class DeviceService:
    def __init__(self, db: Database, box: SecretBox):
        self.db = db
        self.box = box
        self._removal_listeners: list[Callable[[int], None]] = []
        self._module_cap_warned: set[int] = set()  # device ids

    def add_removal_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(device_id)` after a device's deletion commits (any thread, quick): the device
        channel closes its connection, whose identity would otherwise outlive the row."""
        self._removal_listeners.append(listener)

    def remove_removal_listener(self, listener: Callable[[int], None]) -> None:
        if listener in self._removal_listeners:
            self._removal_listeners.remove(listener)

    def _device(self, conn, row) -> Device:
        versions = {m["module_name"]: m["version"] for m in store.module_versions(conn, row["id"])}
        return Device(
            iot_id=row["iot_id"], product_key=row["product_key"], product_name=row["product_name"],
            device_name=row["device_name"], device_secret=self.box.decrypt(row["device_secret_encrypted"]),
            nickname=row["nickname"], node_type=row["node_type"], status=status_of(row),
            firmware_version=versions.get(DEFAULT_MODULE), ip_address=row["ip_address"],
            created_ms=row["created_ms"], modified_ms=row["modified_ms"], active_ms=row["active_ms"],
            online_ms=row["online_ms"], last_seen_ms=row["last_seen_ms"],
        )

    def _row(self, conn, tenant: Tenant, ref: DeviceRef):
        if ref.iot_id:
            row = store.by_iot_id(conn, tenant.instance_pk, ref.iot_id)
        elif ref.product_key and ref.device_name:
            row = store.by_name(conn, ref.product_key, ref.device_name)
            if row is not None and row["instance_pk"] != tenant.instance_pk:
                row = None  # another tenant's device looks exactly like a missing one
        else:
            raise errors.NullDeviceReference()
        if row is None:
            raise errors.NotExistedDevice()
        return row

    def _new_row(self, product_id: int, name: str, nickname: str | None, now: int, apply_id: int | None = None):
        return {
            "iot_id": ids.random_alnum(26),
            "product_id": product_id,
            "device_name": name,
            "device_secret_encrypted": self.box.encrypt(ids.random_alnum(32)),
            "nickname": nickname,
            "created_ms": now,
            "modified_ms": now,
            "apply_id": apply_id,
        }

    # --- registration ---------------------------------------------------------------------------
    def register(self, tenant: Tenant, product_key: str, device_name: str | None, nickname: str | None) -> Device:
        if device_name is not None and not DEVICE_NAME.fullmatch(device_name):
            raise errors.InvalidFormattedDeviceName()
        name = device_name or ids.random_alnum(20)
        try:
            with self.db.begin() as conn:
                product = product_row(conn, tenant, product_key)
                if store.names_taken(conn, product["id"], [name]):
                    raise errors.AlreadyExistedDeviceName()
                if store.count_for_product(conn, product["id"]) >= MAX_DEVICES_PER_PRODUCT:
                    raise errors.DeviceCountExceeded(limit=MAX_DEVICES_PER_PRODUCT)
                row = self._new_row(product["id"], name, nickname, now_ms())
                store.insert_many(conn, [row])
                return self._device(conn, store.by_iot_id(conn, tenant.instance_pk, row["iot_id"]))
        except IntegrityError:  # the name taken meanwhile, or the product deleted (its foreign key)
            self._product_still_there(tenant, product_key)
            raise errors.AlreadyExistedDeviceName() from None

    def batch_register(self, tenant: Tenant, product_key: str, count: int) -> int:
        """Registers `count` devices with generated names at once; the apply is complete on return."""
        apply_id = secrets.randbelow(2**52) + 1
        now = now_ms()
        try:
            with self.db.begin() as conn:
                product = product_row(conn, tenant, product_key)
                if store.count_for_product(conn, product["id"]) + count > MAX_DEVICES_PER_PRODUCT:
                    raise errors.DeviceCountExceeded(limit=MAX_DEVICES_PER_PRODUCT)
                store.insert_apply(conn, apply_id, product["id"], count, "CREATE_SUCCESS", now)
                rows = [self._new_row(product["id"], ids.random_alnum(20), None, now, apply_id) for _ in range(count)]
                for start in range(0, count, 1000):
                    store.insert_many(conn, rows[start:start + 1000])
        except IntegrityError:  # the product deleted meanwhile (its foreign key)
            self._product_still_there(tenant, product_key)
            raise
        return apply_id

    def _product_still_there(self, tenant: Tenant, product_key: str) -> None:
        """NotExistedProduct when a concurrent DeleteProduct took it (what a refused INSERT means then)."""
        with self.db.connect() as conn:
            product_row(conn, tenant, product_key)

    def apply_status(self, tenant: Tenant, product_key: str, apply_id: int) -> tuple[str, list[str]]:
        with self.db.connect() as conn:
            apply = store.get_apply(conn, apply_id, tenant.instance_pk)
            if apply is None or apply["product_key"] != product_key:
                raise errors.ApplyNotFound()
            return apply["status"], store.names_of_apply(conn, apply_id)

    def apply_page(self, tenant: Tenant, apply_id: int, current_page: int, page_size: int) -> DevicePage:
        with self.db.connect() as conn:
            if store.get_apply(conn, apply_id, tenant.instance_pk) is None:
                raise errors.ApplyNotFound()
            total, rows = store.page(conn, store.of_apply(apply_id, tenant.instance_pk),
                                     (current_page - 1) * page_size, page_size)
            return DevicePage(current_page, page_size, total, [self._device(conn, r) for r in rows])

    # --- reads and deletes ----------------------------------------------------------------------
    def get(self, tenant: Tenant, ref: DeviceRef) -> Device:
        with self.db.connect() as conn:
            return self._device(conn, self._row(conn, tenant, ref))

    def page(self, tenant: Tenant, product_key: str, current_page: int, page_size: int) -> DevicePage:
        with self.db.connect() as conn:
            product = product_row(conn, tenant, product_key)
            total, rows = store.page(conn, store.of_product(product["id"]), (current_page - 1) * page_size, page_size)
            return DevicePage(current_page, page_size, total, [self._device(conn, r) for r in rows])

    def delete(self, tenant: Tenant, ref: DeviceRef) -> None:
        with self.db.begin() as conn:
            device_id = self._row(conn, tenant, ref)["id"]
            jobs_of_device = job_store.jobs_of_device(conn, device_id)
            task_flow.count_deleted_verify_tasks(conn, device_id)
            store.delete(conn, device_id)  # its tasks go with it
            # A verify job that waited for this device alone is decided now (its package would
            # stay "verifying" for good): not verified, as the device never succeeded.
            task_flow.refresh_verification(conn, jobs_of_device, now_ms())
        for listener in list(self._removal_listeners):
            listener(device_id)

    def module_versions(self, tenant: Tenant, ref: DeviceRef) -> tuple[Device, list[ModuleVersion]]:
        with self.db.connect() as conn:
            row = self._row(conn, tenant, ref)
            versions = [ModuleVersion(m["module_name"], m["version"]) for m in store.module_versions(conn, row["id"])]
            return self._device(conn, row), versions

    # --- the device side (called by the device channel, not tenant-scoped) ----------------------
    def credentials(self, product_key: str, device_name: str) -> "DeviceCredentials | None":
        """What CONNECT needs to check a device's password; None for an unknown device."""
        with self.db.connect() as conn:
            row = store.by_name(conn, product_key, device_name)
        if row is None:
            return None
        return DeviceCredentials(
            device_id=row["id"], iot_id=row["iot_id"], product_key=product_key, device_name=device_name,
            secret=self.box.decrypt(row["device_secret_encrypted"]), disabled=bool(row["disabled"]),
        )

    def credentials_many(self, names: list[tuple[str, str]]) -> dict[tuple[str, str], "DeviceCredentials"]:
        """`credentials` for many (product_key, device_name) at once (a burst of CONNECTs)."""
        with self.db.connect() as conn:
            rows = store.by_names(conn, names)
        return {
            (row["product_key"], row["device_name"]): DeviceCredentials(
                device_id=row["id"], iot_id=row["iot_id"], product_key=row["product_key"],
                device_name=row["device_name"], secret=self.box.decrypt(row["device_secret_encrypted"]),
                disabled=bool(row["disabled"]),
            )
            for row in rows
        }

    def mark_connected_many(self, connections: list[tuple[int, str | None]], node_id: str) -> int:
        """Many (device_id, ip_address) connected to the channel process `node_id`, in one
        transaction; returns their online_ms, which mark_disconnected passes back."""
        now = now_ms()
        with self.db.write_turn(), self.db.begin() as conn:
            store.mark_connected_many(conn, connections, now, node_id)
        return now

    def channel_heartbeat(self, node_id: str, stale_ms: int) -> tuple[bool, int]:
        """The channel process `node_id` is alive; the devices of processes silent for `stale_ms`
        go OFFLINE (they died without closing their connections). Returns whether `node_id` was
        known (False: its first beat, or it was taken for dead) and how many devices went OFFLINE."""
        now = now_ms()
        with self.db.write_turn(), self.db.begin() as conn:
            known = store.node_heartbeat(conn, node_id, now)
            return known, store.release_dead_nodes(conn, now - stale_ms)

    def existing_ids(self, device_ids: list[int]) -> set[int]:
        """Which of these devices still exist."""
        found: set[int] = set()
        with self.db.connect() as conn:
            for start in range(0, len(device_ids), 500):
                found.update(store.existing_ids(conn, device_ids[start:start + 500]))
        return found

    def forget_channel(self, node_id: str) -> None:
        """A channel process stopping (its devices are marked OFFLINE by mark_disconnected_many)."""
        with self.db.write_turn(), self.db.begin() as conn:
            store.forget_node(conn, node_id)

    def mark_disconnected(self, device_id: int, online_ms: int | None = None) -> None:
        """With `online_ms`, only while that connection is still the device's latest (a newer one,
        maybe through another server process, keeps the device ONLINE)."""
        with self.db.write_turn(), self.db.begin() as conn:
            store.mark_disconnected(conn, device_id, now_ms(), online_ms)

    def mark_disconnected_many(self, connections: list[tuple[int, int]]) -> None:
        """(device_id, online_ms) pairs: a device channel closing all its connections at once."""
        with self.db.write_turn(), self.db.begin() as conn:
            store.mark_disconnected_many(conn, connections, now_ms())

    def report_version(self, device_id: int, module: str | None, version: str) -> bool:
        now = now_ms()
        with self.db.begin() as conn:
            return self.record_version(conn, device_id, module or DEFAULT_MODULE, version, now)

    def record_version(self, conn, device_id: int, module: str, version: str, now: int) -> bool:
        """`report_version` inside the caller's transaction. False when refused: the module is new
        to a device that has MAX_MODULES_PER_DEVICE modules already (those are still updated)."""
        if store.set_module_version_and_seen(conn, device_id, module, version, now, MAX_MODULES_PER_DEVICE):
            return True
        self._warn_module_cap(conn, device_id, module)
        return False

    def _warn_module_cap(self, conn, device_id: int, module: str) -> None:
        """Once per device: a device that makes up module names may send them by the thousand."""
        if device_id in self._module_cap_warned:
            return
        if len(self._module_cap_warned) >= MODULE_CAP_WARNED_MAX:
            self._module_cap_warned.clear()
        self._module_cap_warned.add(device_id)
        log.warning("device %s reports module %r, but it has %d modules already: versions of modules new to it "
                    "are dropped (logged once)", store.name_of(conn, device_id), module, MAX_MODULES_PER_DEVICE)

    def mark_seen(self, device_id: int) -> None:
        """A message from the device through an external broker (which reports no connects):
        last_seen_ms now, and the device counts as activated."""
        now = now_ms()
        with self.db.write_turn(), self.db.begin() as conn:
            store.update(conn, device_id, {"last_seen_ms": now,
                                           "active_ms": sa.func.coalesce(store.devices.c.active_ms, now)})


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: int
    iot_id: str
    product_key: str
    device_name: str
    secret: str
    disabled: bool
