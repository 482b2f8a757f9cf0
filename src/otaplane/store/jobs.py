"""Queries for upgrade jobs and their tasks (reads and inserts; state changes are in
services/task_flow.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from otaplane.store.schema import UNFINISHED_TASK_STATUSES as UNFINISHED
from otaplane.store.schema import WAITING_FOR_RETRY
from otaplane.store.schema import device_modules, devices, firmware, ota_jobs, ota_tasks, products

_CHUNK = 500

_JOB = (
    sa.select(ota_jobs, firmware.c.firmware_id, firmware.c.name.label("firmware_name"),
              firmware.c.dest_version, products.c.product_key)
    .join(firmware, firmware.c.id == ota_jobs.c.firmware_pk)
    .join(products, products.c.id == ota_jobs.c.product_id)
)

_TASK = (
    sa.select(ota_tasks, ota_jobs.c.job_id, firmware.c.firmware_id, firmware.c.dest_version,
              devices.c.iot_id, devices.c.device_name, products.c.product_key, products.c.product_name,
              ota_jobs.c.timeout_minutes)
    .join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
    .join(firmware, firmware.c.id == ota_jobs.c.firmware_pk)
    .join(devices, devices.c.id == ota_tasks.c.device_id)
    .join(products, products.c.id == devices.c.product_id)
)


def job(conn: Connection, instance_pk: int, job_id: str) -> RowMapping | None:
    row = conn.execute(_JOB.where(ota_jobs.c.job_id == job_id, ota_jobs.c.instance_pk == instance_pk)).first()
    return row._mapping if row else None


def job_by_pk(conn: Connection, job_pk: int) -> RowMapping | None:
    row = conn.execute(_JOB.where(ota_jobs.c.id == job_pk)).first()
    return row._mapping if row else None


def jobs_page(conn: Connection, condition, offset: int, limit: int) -> tuple[int, list[RowMapping]]:
    total = conn.execute(sa.select(sa.func.count()).select_from(ota_jobs).where(condition)).scalar_one()
    rows = conn.execute(_JOB.where(condition).order_by(ota_jobs.c.created_ms.desc(), ota_jobs.c.id.desc())
                        .offset(offset).limit(limit))
    return total, [row._mapping for row in rows]


def insert_job(conn: Connection, values: dict[str, Any]) -> int:
    return conn.execute(sa.insert(ota_jobs).values(**values).returning(ota_jobs.c.id)).scalar_one()


def update_job(conn: Connection, job_pk: int, values: dict[str, Any]) -> None:
    conn.execute(sa.update(ota_jobs).where(ota_jobs.c.id == job_pk).values(**values))


def insert_tasks(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert tasks; returns their ids in the order given."""
    ids: list[int] = []
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        result = conn.execute(sa.insert(ota_tasks).returning(ota_tasks.c.id, sort_by_parameter_order=True), chunk)
        ids.extend(result.scalars().all())
    return ids


def product_devices(conn: Connection, product_id: int, module_name: str) -> list[RowMapping]:
    """id, name and the module's reported version of every device of the product."""
    query = (
        sa.select(devices.c.id, devices.c.device_name, device_modules.c.version)
        .select_from(devices)
        .outerjoin(device_modules, sa.and_(device_modules.c.device_id == devices.c.id,
                                           device_modules.c.module_name == module_name))
        .where(devices.c.product_id == product_id)
        .order_by(devices.c.id)
    )
    return [row._mapping for row in conn.execute(query)]


def devices_by_name(conn: Connection, product_id: int, module_name: str, names: list[str]) -> list[RowMapping]:
    found: list[RowMapping] = []
    for start in range(0, len(names), _CHUNK):
        query = (
            sa.select(devices.c.id, devices.c.device_name, device_modules.c.version)
            .select_from(devices)
            .outerjoin(device_modules, sa.and_(device_modules.c.device_id == devices.c.id,
                                               device_modules.c.module_name == module_name))
            .where(devices.c.product_id == product_id, devices.c.device_name.in_(names[start:start + _CHUNK]))
        )
        found.extend(row._mapping for row in conn.execute(query))
    return found


def unfinished_by_device(conn: Connection, device_ids: Iterable[int], module_name: str,
                         multi_module: bool) -> dict[int, list[RowMapping]]:
    """device id -> the unfinished tasks that keep it from taking a new task for `module_name`
    (in a job with MultiModuleMode `multi_module`): a device upgrades one module at a time,
    unless both jobs allow several modules at once; then only the module's own task counts
    (one at most, by the unique index)."""
    keys = sorted(set(device_ids))
    found: dict[int, list[RowMapping]] = {}
    conflict = ota_tasks.c.status.in_(UNFINISHED)
    if multi_module:
        conflict = sa.and_(conflict, sa.or_(ota_tasks.c.module_name == module_name, ota_jobs.c.multi_module.is_(False)))
    for start in range(0, len(keys), _CHUNK):
        rows = conn.execute(
            sa.select(ota_tasks.c.id, ota_tasks.c.device_id, ota_tasks.c.module_name, ota_jobs.c.job_id)
            .join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
            .where(ota_tasks.c.device_id.in_(keys[start:start + _CHUNK]), conflict)
            .order_by(ota_tasks.c.id)
        )
        for row in rows:
            found.setdefault(row.device_id, []).append(row._mapping)
    return found


def tasks_page(conn: Connection, job_pk: int, statuses: list[str] | None, device_names: list[str] | None,
               offset: int, limit: int) -> tuple[int, list[RowMapping]]:
    condition = [ota_tasks.c.job_pk == job_pk]
    if statuses:
        condition.append(ota_tasks.c.status.in_(statuses))
    if device_names:
        condition.append(devices.c.device_name.in_(device_names))
    where = sa.and_(*condition)
    total = conn.execute(sa.select(sa.func.count()).select_from(
        ota_tasks.join(devices, devices.c.id == ota_tasks.c.device_id)).where(where)).scalar_one()
    rows = conn.execute(_TASK.where(where).order_by(ota_tasks.c.id).offset(offset).limit(limit))
    return total, [row._mapping for row in rows]


def tasks_by_ids(conn: Connection, instance_pk: int, task_ids: list[str]) -> list[RowMapping]:
    rows = conn.execute(_TASK.where(ota_tasks.c.task_id.in_(task_ids), ota_jobs.c.instance_pk == instance_pk))
    return [row._mapping for row in rows]


def device_unfinished_tasks(conn: Connection, device_id: int, module_name: str | None,
                            statuses: list[str]) -> list[RowMapping]:
    condition = [ota_tasks.c.device_id == device_id, ota_tasks.c.status.in_(statuses)]
    if module_name:
        condition.append(ota_tasks.c.module_name == module_name)
    return [row._mapping for row in conn.execute(_TASK.where(*condition).order_by(ota_tasks.c.id))]


def tasks_owning_push(conn: Connection, device_id: int, module_name: str) -> list[RowMapping]:
    """The device's tasks for the module that have its push, or will: unfinished ones, and failed
    ones waiting for a retry."""
    condition = [ota_tasks.c.device_id == device_id, ota_tasks.c.module_name == module_name,
                 sa.or_(ota_tasks.c.status.in_(UNFINISHED), WAITING_FOR_RETRY)]
    return [row._mapping for row in conn.execute(_TASK.where(*condition).order_by(ota_tasks.c.id))]


def jobs_of_device(conn: Connection, device_id: int) -> list[int]:
    """The jobs that have a task for the device."""
    return list(conn.execute(sa.select(ota_tasks.c.job_pk).distinct().where(ota_tasks.c.device_id == device_id))
                .scalars())


def task_ids_of_job(conn: Connection, job_pk: int, statuses: Iterable[str]) -> list[int]:
    return list(conn.execute(sa.select(ota_tasks.c.id).where(ota_tasks.c.job_pk == job_pk,
                                                             ota_tasks.c.status.in_(list(statuses)))).scalars())


def status_counts(conn: Connection, job_pk: int) -> dict[str, int]:
    return dict(conn.execute(sa.select(ota_tasks.c.status, sa.func.count()).where(ota_tasks.c.job_pk == job_pk)
                             .group_by(ota_tasks.c.status)).all())


# A failed task that will run again: its retry is scheduled, and it has retries left.
RETRY_PENDING = sa.and_(WAITING_FOR_RETRY, ota_tasks.c.retries_left > 0)


def retry_pending(conn: Connection, job_pk: int) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(ota_tasks).where(
        ota_tasks.c.job_pk == job_pk, RETRY_PENDING)).scalar_one()


def job_has_device(conn: Connection, job_pk: int, device_id: int) -> bool:
    return conn.execute(sa.select(ota_tasks.c.id).where(ota_tasks.c.job_pk == job_pk,
                                                        ota_tasks.c.device_id == device_id).limit(1)).first() is not None


def firmware_has_unfinished_tasks(conn: Connection, firmware_pk: int) -> bool:
    """Whether a job of the package, whatever its status, has a task not finished (a dynamic job
    whose strategy was cancelled still serves its tasks)."""
    return conn.execute(sa.select(
        sa.select(ota_tasks.c.id).join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
        .where(ota_jobs.c.firmware_pk == firmware_pk, ota_tasks.c.status.in_(UNFINISHED)).exists()
    )).scalar_one()


def running_jobs_of_firmware(conn: Connection, firmware_pk: int, selection_type: str | None = None) -> int:
    condition = [ota_jobs.c.firmware_pk == firmware_pk, ota_jobs.c.status.in_(("PLANNED", "IN_PROGRESS"))]
    if selection_type:
        condition.append(ota_jobs.c.selection_type == selection_type)
    return conn.execute(sa.select(sa.func.count()).select_from(ota_jobs).where(*condition)).scalar_one()
