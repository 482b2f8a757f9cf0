"""Queries for the packages devices should install (`device_ota_pending`)."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping

from otaplane.store.prepared import Prepared
from otaplane.store.schema import WAITING_FOR_RETRY
from otaplane.store.schema import device_ota_pending as pending
from otaplane.store.schema import devices, firmware, firmware_files, ota_jobs, ota_modules, ota_tasks, products

# A pending row with everything a push needs.
_PACKAGE = (
    sa.select(
        pending.c.device_id,
        pending.c.module_name,
        pending.c.message_id,
        pending.c.progress,
        pending.c.progress_desc,
        pending.c.delivered_ms,
        pending.c.push_again_ms,
        pending.c.firmware_pk,
        firmware.c.firmware_id,
        firmware.c.dest_version,
        firmware.c.size,
        firmware.c.sign_method,
        firmware.c.sign,
        firmware.c.md5,
        firmware.c.blob_key,
        firmware.c.type,
        firmware.c.udi,
        ota_modules.c.is_default.label("module_is_default"),
        products.c.product_key,
        devices.c.device_name,
        ota_jobs.c.download_protocol,  # None: a push without a job (HTTPS)
    )
    .join(firmware, firmware.c.id == pending.c.firmware_pk)
    .join(ota_modules, ota_modules.c.id == firmware.c.module_id)
    .join(devices, devices.c.id == pending.c.device_id)
    .join(products, products.c.id == devices.c.product_id)
    .outerjoin(ota_tasks, ota_tasks.c.id == pending.c.task_pk)
    .outerjoin(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
)

# The single file of a package of the device's own product: what its MQTT download may read.
_STREAM = Prepared(
    sa.select(firmware.c.blob_key, firmware.c.size)
    .join(devices, devices.c.product_id == firmware.c.product_id)
    .where(firmware.c.id == sa.bindparam("p_stream"), devices.c.id == sa.bindparam("p_device"),
           firmware.c.blob_key.is_not(None))
)


def stream_file(conn: Connection, device_id: int, stream_id: int) -> RowMapping | None:
    """(blob_key, size) of the package behind a streamId the device may download, else None."""
    return _STREAM.first(conn, p_stream=stream_id, p_device=device_id)


# A failed upgrade (a step of -1..-4) is not offered again until the next push.
_OFFERABLE = sa.or_(pending.c.progress.is_(None), pending.c.progress >= 0)


def device_row(conn: Connection, instance_pk: int | None, iot_id: str | None,
               product_key: str | None, device_name: str | None) -> RowMapping | None:
    """id and product of a device, within one instance (or any, for instance_pk None)."""
    query = sa.select(devices.c.id, devices.c.product_id, products.c.instance_pk).join(
        products, products.c.id == devices.c.product_id)
    if iot_id:
        query = query.where(devices.c.iot_id == iot_id)
    else:
        query = query.where(products.c.product_key == product_key, devices.c.device_name == device_name)
    if instance_pk is not None:
        query = query.where(products.c.instance_pk == instance_pk)
    row = conn.execute(query).first()
    return row._mapping if row else None


def firmware_row(conn: Connection, instance_pk: int | None, firmware_id: str) -> RowMapping | None:
    query = sa.select(firmware.c.id, firmware.c.product_id, ota_modules.c.module_name).join(
        ota_modules, ota_modules.c.id == firmware.c.module_id).where(firmware.c.firmware_id == firmware_id)
    if instance_pk is not None:
        query = query.where(firmware.c.instance_pk == instance_pk)
    row = conn.execute(query).first()
    return row._mapping if row else None


def firmware_target(conn: Connection, firmware_pk: int) -> RowMapping | None:
    row = conn.execute(
        sa.select(firmware.c.id, firmware.c.product_id, ota_modules.c.module_name)
        .join(ota_modules, ota_modules.c.id == firmware.c.module_id)
        .where(firmware.c.id == firmware_pk)
    ).first()
    return row._mapping if row else None


def device_products(conn: Connection, device_ids: list[int]) -> dict[int, int]:
    """device id -> product id, for those that exist."""
    found: dict[int, int] = {}
    for start in range(0, len(device_ids), 500):
        rows = conn.execute(sa.select(devices.c.id, devices.c.product_id)
                            .where(devices.c.id.in_(device_ids[start:start + 500])))
        found.update({row.id: row.product_id for row in rows})
    return found


def upsert(conn: Connection, device_id: int, module_name: str, firmware_pk: int, message_id: int,
           now_ms: int, task_pk: int | None = None, push: bool = True) -> None:
    """The device's package for the module from now on; it replaces any earlier one.
    `task_pk`: the upgrade task it belongs to; `push` False: only given when the device asks."""
    upsert_many(conn, [pending_row(device_id, module_name, firmware_pk, message_id, now_ms, task_pk, push)])


def pending_row(device_id: int, module_name: str, firmware_pk: int, message_id: int, now_ms: int,
                task_pk: int | None = None, push: bool = True) -> dict:
    return {"device_id": device_id, "module_name": module_name, "firmware_pk": firmware_pk,
            "message_id": message_id, "progress": None, "progress_desc": None, "delivered_ms": None,
            "created_ms": now_ms, "modified_ms": now_ms, "task_pk": task_pk, "push": push, "push_again_ms": None,
            "publishing_ms": None, "re_offered_ms": None}


# Every column but the key and created_ms: a new push starts afresh. Its claims too (claim):
# those of the push it replaces would hold the new one back for their whole hold.
_REPLACED = ("firmware_pk", "message_id", "progress", "progress_desc", "delivered_ms", "modified_ms", "task_pk", "push",
             "push_again_ms", "publishing_ms", "re_offered_ms")


def _upsert_statement(dialect_name: str):
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(pending)
    return statement.on_conflict_do_update(
        index_elements=[pending.c.device_id, pending.c.module_name],
        set_={name: statement.excluded[name] for name in _REPLACED},
    )


_UPSERT = {name: _upsert_statement(name) for name in ("postgresql", "sqlite")}


def upsert_many(conn: Connection, rows: list[dict]) -> None:
    """`upsert` for many rows (pending_row dicts) in one executemany: the statement is built once."""
    if rows:
        conn.execute(_UPSERT["postgresql" if conn.dialect.name == "postgresql" else "sqlite"], rows)


# What a connecting device is pushed: packages it may be pushed (not NeedPush=false ones), and of
# an upgrade task's only one it has not taken yet: an attempt is pushed once (the device asks with
# firmware/get if it lost it; a retry is a new attempt). A push without a task goes again.
_PUSH_ON_CONNECT = sa.and_(pending.c.push.is_(True),
                           sa.or_(pending.c.task_pk.is_(None), pending.c.delivered_ms.is_(None)))


def offers(conn: Connection, device_id: int, module_name: str | None = None,
           pushed_only: bool = False) -> list[RowMapping]:
    """The device's packages; `pushed_only`: what it is pushed when it connects."""
    query = _PACKAGE.where(pending.c.device_id == device_id, _OFFERABLE)
    if pushed_only:
        query = query.where(_PUSH_ON_CONNECT)
    if module_name is not None:
        query = query.where(pending.c.module_name == module_name)
    return [row._mapping for row in conn.execute(query.order_by(pending.c.module_name))]


def undelivered_online(conn: Connection, limit: int, after: tuple[int, str] | None = None) -> list[sa.Row]:
    """(device_id, module_name, message_id) of pushes not yet delivered to devices that some
    server process has online, oldest first: in (modified_ms, device_id, module_name) order.
    `after` (device_id, module_name): the rows that follow that one (keyset paging)."""
    return _undelivered(conn, limit, after, devices.c.online.is_(True))


def undelivered_any(conn: Connection, limit: int, after: tuple[int, str] | None = None) -> list[sa.Row]:
    """`undelivered_online` whatever the devices' online state (an external broker: otaplane
    does not know who is connected)."""
    return _undelivered(conn, limit, after)


def _undelivered(conn: Connection, limit: int, after: tuple[int, str] | None, *where) -> list[sa.Row]:
    query = (
        sa.select(pending.c.device_id, pending.c.module_name, pending.c.message_id)
        .join(devices, devices.c.id == pending.c.device_id)
        .where(pending.c.delivered_ms.is_(None), pending.c.push.is_(True), _OFFERABLE, *where)
        .order_by(pending.c.modified_ms, pending.c.device_id, pending.c.module_name)
        .limit(limit)
    )
    if after is not None:
        # The position of the row `after` now (by primary key). Gone since (installed, deleted):
        # NULL, no row compares greater, and the page is empty (the next sweep starts afresh).
        device_id, module_name = after
        row = pending.alias("after_row")  # not correlated with the outer query's rows
        previous = (
            sa.select(row.c.modified_ms)
            .where(row.c.device_id == device_id, row.c.module_name == module_name)
            .scalar_subquery()
        )
        query = query.where(sa.tuple_(pending.c.modified_ms, pending.c.device_id, pending.c.module_name)
                            > sa.tuple_(previous, device_id, module_name))
    return list(conn.execute(query))


def for_devices(conn: Connection, device_ids: list[int]) -> list[RowMapping]:
    """The packages to push to these devices when they connect (see _PUSH_ON_CONNECT)."""
    found: list[RowMapping] = []
    for start in range(0, len(device_ids), 500):
        query = _PACKAGE.where(pending.c.device_id.in_(device_ids[start:start + 500]), _OFFERABLE,
                               _PUSH_ON_CONNECT)
        found.extend(row._mapping for row in conn.execute(query))
    return found


def files_of(conn: Connection, firmware_pks: Iterable[int]) -> dict[int, list[RowMapping]]:
    keys = sorted(set(firmware_pks))
    found: dict[int, list[RowMapping]] = {}
    for start in range(0, len(keys), 500):
        rows = conn.execute(
            sa.select(firmware_files)
            .where(firmware_files.c.firmware_pk.in_(keys[start:start + 500]))
            .order_by(firmware_files.c.firmware_pk, firmware_files.c.position)
        )
        for row in rows:
            found.setdefault(row.firmware_pk, []).append(row._mapping)
    return found


def mark_delivered(conn: Connection, items: Iterable[tuple[int, str, int]], now_ms: int) -> None:
    """(device_id, module_name, message_id): only that push, not one that replaced it since. The
    device has it now: a push-again scheduled for it (push_again) is off."""
    params = [{"p_device": d, "p_module": m, "p_message": i, "p_now": now_ms} for d, m, i in items]
    if params:
        conn.execute(
            sa.update(pending)
            .where(pending.c.device_id == sa.bindparam("p_device"),
                   pending.c.module_name == sa.bindparam("p_module"),
                   pending.c.message_id == sa.bindparam("p_message"))
            .values(delivered_ms=sa.bindparam("p_now"), push_again_ms=sa.null()),
            params,
        )


def claim(conn: Connection, items: Iterable[tuple[int, str, int]], stamp: str, now_ms: int,
          hold_ms: int) -> list[tuple[int, str, int]]:
    """Stamp each push (device_id, module_name, message_id) in its `stamp` column (publishing_ms
    or re_offered_ms) unless another process stamped it less than `hold_ms` ago: the pushes this
    process may publish now. The UPDATE's own condition decides, so of processes racing for one
    push exactly one wins (the row's lock on PostgreSQL, the write lock on SQLite)."""
    column = pending.c[stamp]
    statement = (
        sa.update(pending)
        .where(pending.c.device_id == sa.bindparam("p_device"),
               pending.c.module_name == sa.bindparam("p_module"),
               pending.c.message_id == sa.bindparam("p_message"),
               sa.or_(column.is_(None), column <= sa.bindparam("p_before")))
        .values({stamp: sa.bindparam("p_now")})
    )
    claimed = []
    for item in sorted(items):  # device order: the lock order of every batch
        device_id, module_name, message_id = item
        result = conn.execute(statement, {"p_device": device_id, "p_module": module_name, "p_message": message_id,
                                          "p_now": now_ms, "p_before": now_ms - hold_ms})
        if result.rowcount:
            claimed.append(item)
    return claimed


def release(conn: Connection, items: Iterable[tuple[int, str, int]], stamp: str, at_ms: int) -> None:
    """Undo `claim`s stamped `at_ms` (a later claim by another process stays)."""
    column = pending.c[stamp]
    conn.execute(
        sa.update(pending)
        .where(pending.c.device_id == sa.bindparam("p_device"), pending.c.module_name == sa.bindparam("p_module"),
               pending.c.message_id == sa.bindparam("p_message"), column == sa.bindparam("p_at"))
        .values({stamp: None}),
        [{"p_device": d, "p_module": m, "p_message": i, "p_at": at_ms} for d, m, i in sorted(items)],
    )


_RECORD_PROGRESS = Prepared(
    sa.update(pending)
    .where(pending.c.device_id == sa.bindparam("p_device"), pending.c.module_name == sa.bindparam("p_module"))
    # A progress report says the device works on the push: a push-again scheduled is off.
    .values(progress=sa.bindparam("p_step"), progress_desc=sa.bindparam("p_desc"), modified_ms=sa.bindparam("p_now"),
            push_again_ms=sa.null())
)


def record_progress(conn: Connection, device_id: int, module_name: str, step: int, desc: str | None,
                    now_ms: int) -> int:
    """Inside a transaction begun on `conn` (a prepared statement: it runs for every report). The
    row's modified_ms is the time of its last progress report (or of its push, or push-again)."""
    return _RECORD_PROGRESS.rowcount(conn, p_device=device_id, p_module=module_name, p_step=step, p_desc=desc,
                                     p_now=now_ms)


_CLEAR_INSTALLED = Prepared(
    sa.delete(pending).where(
        pending.c.device_id == sa.bindparam("p_device"),
        pending.c.module_name == sa.bindparam("p_module"),
        sa.exists().where(firmware.c.id == pending.c.firmware_pk, firmware.c.dest_version == sa.bindparam("p_version")),
    )
)


def clear_installed(conn: Connection, device_id: int, module_name: str, version: str) -> int:
    """Forget the module's package when the device reports its DestVersion (inside a
    transaction begun on `conn`; a prepared statement: it runs for every version report)."""
    return _CLEAR_INSTALLED.rowcount(conn, p_device=device_id, p_module=module_name, p_version=version)


def set_firmware_md5(conn: Connection, firmware_pk: int, md5: str) -> None:
    conn.execute(sa.update(firmware).where(firmware.c.id == firmware_pk).values(md5=md5))


# What a device report needs of the task behind its push (task_of, progress_and_task).
_TASK_COLUMNS = (ota_tasks.c.id, ota_tasks.c.status, ota_tasks.c.progress, ota_tasks.c.job_pk,
                 ota_tasks.c.src_version, firmware.c.dest_version, ota_jobs.c.timeout_minutes)
_TASK_OF = Prepared(
    sa.select(*_TASK_COLUMNS)
    .select_from(pending)
    .join(ota_tasks, ota_tasks.c.id == pending.c.task_pk)
    .join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
    .join(firmware, firmware.c.id == pending.c.firmware_pk)
    .where(pending.c.device_id == sa.bindparam("p_device"), pending.c.module_name == sa.bindparam("p_module"))
    # PostgreSQL: the push row is locked first, then (by the state change) the task, the order
    # every path takes; SQLite ignores FOR UPDATE (one writer at a time anyway).
    .with_for_update(of=pending)
)


def task_of(conn: Connection, device_id: int, module_name: str) -> dict | None:
    """The upgrade task behind the device's pending package for the module, with the task's
    state and the package's DestVersion; None when there is none (or no task behind it).
    Runs for every device report: a prepared statement."""
    return _TASK_OF.first(conn, p_device=device_id, p_module=module_name)


# PostgreSQL: record_progress and task_of in one round trip. The UPDATE locks the push row, as
# task_of's FOR UPDATE OF does; a push row without a task gives one row of NULL task columns.
_PUSHED = _RECORD_PROGRESS.statement.returning(pending.c.task_pk, pending.c.firmware_pk).cte("pushed")
_PROGRESS_AND_TASK_PG = Prepared(
    sa.select(*_TASK_COLUMNS)
    .select_from(_PUSHED)
    .outerjoin(ota_tasks, ota_tasks.c.id == _PUSHED.c.task_pk)
    .outerjoin(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
    .outerjoin(firmware, firmware.c.id == _PUSHED.c.firmware_pk)
)


def progress_and_task(conn: Connection, device_id: int, module_name: str, step: int, desc: str | None,
                      now_ms: int) -> tuple[bool, dict | None]:
    """`record_progress`, then `task_of` when the device has a push for the module: (whether it
    has one, the task behind it or None). Inside a transaction begun on `conn`."""
    if conn.dialect.name != "postgresql":
        if record_progress(conn, device_id, module_name, step, desc, now_ms) == 0:
            return False, None
        return True, task_of(conn, device_id, module_name)
    row = _PROGRESS_AND_TASK_PG.first(conn, p_device=device_id, p_module=module_name, p_step=step, p_desc=desc,
                                      p_now=now_ms)
    if row is None:
        return False, None
    return True, (row if row["id"] is not None and row["job_pk"] is not None else None)


# A delivered push made undelivered: the sweeps push it again, under a new message id. It is a new
# message, not a redelivery: a device that drops ids it handled (QoS 1 duplicates) must act on it,
# and the embedded broker sends an id once per connection. The claim of its last publish is done
# with (it was delivered), and would hold the new one back on an external broker.
_AGAIN = {"delivered_ms": sa.null(), "modified_ms": sa.bindparam("p_now"), "push_again_ms": sa.null(),
          "publishing_ms": sa.null(), "message_id": sa.bindparam("p_new_message", type_=sa.BigInteger)}
_PUSH_AGAIN = Prepared(
    sa.update(pending)
    .where(pending.c.device_id == sa.bindparam("p_device"), pending.c.module_name == sa.bindparam("p_module"),
           pending.c.delivered_ms <= sa.bindparam("p_before"), pending.c.modified_ms <= sa.bindparam("p_before"))
    .values(_AGAIN)
)
# The end of the quiet period: the later of the delivery and the last progress report. Not
# modified_ms alone: it is the time the push was made (or last made undelivered) until the device
# reports progress, and a push may be delivered long after it was made (an offline device).
_QUIET_SINCE = sa.case((pending.c.delivered_ms > pending.c.modified_ms, pending.c.delivered_ms),
                       else_=pending.c.modified_ms)
_PUSH_AGAIN_LATER = Prepared(
    sa.update(pending)
    .where(pending.c.device_id == sa.bindparam("p_device"), pending.c.module_name == sa.bindparam("p_module"),
           pending.c.delivered_ms.is_not(None))
    .values(push_again_ms=_QUIET_SINCE + sa.bindparam("p_quiet", type_=sa.BigInteger))
)


def push_again(conn: Connection, device_id: int, module_name: str, now_ms: int, quiet_ms: int,
               new_message_id: int) -> str | None:
    """Make the module's delivered push undelivered again, so that the device channel pushes it
    anew: now when neither the push nor the device's last progress report is under `quiet_ms`
    old ("now"), else once they are (`push_again_ms`, "later": made undelivered by
    push_due_again, unless the device reports progress or takes the push before). The quiet
    period keeps the push from going twice to a device that reported its version as the push
    went out, or while it downloads. None: the push is not delivered yet (it is on its way)."""
    if _PUSH_AGAIN.rowcount(conn, p_device=device_id, p_module=module_name, p_before=now_ms - quiet_ms,
                            p_now=now_ms, p_new_message=new_message_id) > 0:
        return "now"
    if _PUSH_AGAIN_LATER.rowcount(conn, p_device=device_id, p_module=module_name, p_quiet=quiet_ms) > 0:
        return "later"
    return None


_DUE_AGAIN = (
    sa.select(pending.c.device_id, pending.c.module_name, pending.c.message_id)
    .where(pending.c.push_again_ms <= sa.bindparam("p_now"))
    .order_by(pending.c.device_id, pending.c.module_name)
)
_PUSH_DUE_AGAIN = (
    sa.update(pending)
    .where(pending.c.device_id == sa.bindparam("p_device"), pending.c.module_name == sa.bindparam("p_module"),
           pending.c.message_id == sa.bindparam("p_message"), pending.c.push_again_ms <= sa.bindparam("p_now"))
    .values(_AGAIN)
)


def due_again(conn: Connection, now_ms: int, limit: int) -> list[tuple[int, str, int]]:
    """(device_id, module_name, message_id) of pushes whose push-again (push_again) is due, in
    device order (cheap when there is none: an indexed range that is empty)."""
    return [tuple(r) for r in conn.execute(_DUE_AGAIN.limit(limit), {"p_now": now_ms})]


def push_due_again(conn: Connection, items: Iterable[tuple[int, str, int, int]], now_ms: int) -> int:
    """Make these pushes (due_again's, each with its new message id) undelivered, those whose
    push-again is still due (not called off, by a progress report or a delivery, since they were
    read): how many were. Row by row in device order, the lock order of device report batches;
    of processes racing for a row, one makes it undelivered."""
    done = 0
    for device_id, module_name, message_id, new_message_id in sorted(items):
        done += conn.execute(_PUSH_DUE_AGAIN, {"p_device": device_id, "p_module": module_name,
                                               "p_message": message_id, "p_now": now_ms,
                                               "p_new_message": new_message_id}).rowcount
    return done


_WAITING_TASK = Prepared(
    sa.select(ota_tasks.c.id, ota_tasks.c.status)
    .join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
    .join(firmware, firmware.c.id == ota_jobs.c.firmware_pk)
    .where(ota_tasks.c.device_id == sa.bindparam("p_device"), ota_tasks.c.module_name == sa.bindparam("p_module"),
           sa.or_(ota_tasks.c.status == sa.bindparam("p_queued"), WAITING_FOR_RETRY),
           firmware.c.dest_version == sa.bindparam("p_version"))
)


def waiting_task(conn: Connection, device_id: int, module_name: str, version: str) -> dict | None:
    """The device's task for the module that is not pushed yet (QUEUED: paced or scheduled) or
    waits for its retry (FAILED with due_ms), of a package whose DestVersion is `version`."""
    return _WAITING_TASK.first(conn, p_device=device_id, p_module=module_name, p_version=version,
                               p_queued="QUEUED")


def tasks_of_pushes(conn: Connection, items: Iterable[tuple[int, str, int]]) -> list[int]:
    """Task ids behind these pushes (device_id, module_name, message_id), if still pending."""
    wanted = set(items)
    devices_of = sorted({device_id for device_id, _, _ in wanted})
    found: list[int] = []
    for start in range(0, len(devices_of), 500):
        rows = conn.execute(
            sa.select(pending.c.device_id, pending.c.module_name, pending.c.message_id, pending.c.task_pk)
            .where(pending.c.device_id.in_(devices_of[start:start + 500]), pending.c.task_pk.is_not(None))
        )
        found.extend(row.task_pk for row in rows if (row.device_id, row.module_name, row.message_id) in wanted)
    return found
