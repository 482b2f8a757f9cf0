"""The one place where an upgrade task changes state.

`move` checks that each change is allowed (a task moves only from the states listed in ALLOWED),
writes the new state and a history row (who or what moved it, when, why), and does what the new
state implies: a cancelled or failed task's push is withdrawn, a failed task with retries left
gets its retry time, and a verify job's package gets its Status and VerifyProgress.

Everything runs on the caller's connection, inside the caller's transaction, so a state change
and its consequences commit together or not at all. Rows are guarded twice: the UPDATE repeats
the allowed-from condition, so two processes racing on one task cannot both move it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from otaplane.store.prepared import Prepared
from otaplane.store.schema import UNFINISHED_TASK_STATUSES, WAITING_FOR_RETRY
from otaplane.store.schema import device_ota_pending as pending
from otaplane.store.schema import firmware, ota_jobs, ota_task_events, ota_tasks

CONFIRM = "CONFIRM"
QUEUED = "QUEUED"
NOTIFIED = "NOTIFIED"
IN_PROGRESS = "IN_PROGRESS"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELED = "CANCELED"

TASK_STATUSES = (CONFIRM, QUEUED, NOTIFIED, IN_PROGRESS, SUCCEEDED, FAILED, CANCELED)
UNFINISHED = UNFINISHED_TASK_STATUSES
FINAL = (SUCCEEDED, FAILED, CANCELED)

# to-state -> the states a task may come from.
ALLOWED: Mapping[str, tuple[str, ...]] = {
    QUEUED: (CONFIRM, FAILED, CANCELED),  # confirmed; retried; re-upgraded
    CONFIRM: (FAILED, CANCELED),  # re-upgraded in a job that needs confirmation
    NOTIFIED: (QUEUED,),  # the device took the push (or asked for it)
    IN_PROGRESS: (QUEUED, NOTIFIED),  # first progress report
    SUCCEEDED: (QUEUED, NOTIFIED, IN_PROGRESS, FAILED),  # reported the DestVersion (FAILED: a retry was due)
    FAILED: (QUEUED, NOTIFIED, IN_PROGRESS),  # failure step, timeout, bad version
    CANCELED: UNFINISHED,
}

# Firmware Status values a verify job drives.
FIRMWARE_UNVERIFIED = 0
FIRMWARE_VERIFIED = 1
FIRMWARE_VERIFYING = 2
FIRMWARE_VERIFY_FAILED = 3
VERIFY_JOB = "VERFIY_FIRMWARE"  # sic: the platform's spelling on the wire

_CHUNK = 500


@dataclass(frozen=True)
class Moved:
    task_pk: int
    job_pk: int
    device_id: int
    module_name: str
    from_status: str


def move(conn: Connection, task_pks: Iterable[int], to: str, *, actor: str, now_ms: int,
         reason: str | None = None, values: Mapping[str, Any] | None = None,
         minute_ms: int = 60_000) -> list[Moved]:
    """Move the tasks that may go to `to`; the others are left alone. Returns those moved.
    `values`: more columns to set on the moved rows (progress, description, deadline ...).
    `minute_ms`: how long a job "minute" is (retry intervals); shortened only in tests."""
    moved: list[Moved] = []
    verify_jobs: set[int] = set()
    keys = sorted(set(task_pks))
    update = {"status": to, "modified_ms": now_ms, **(values or {})}
    if to in (SUCCEEDED, FAILED, CANCELED):
        update.setdefault("deadline_ms", None)
    if to == CANCELED or to == SUCCEEDED:
        update.setdefault("due_ms", None)
    if reason is not None and to in (FAILED, CANCELED):
        update.setdefault("description", reason[:256])  # TaskDesc says why it ended
    if to == SUCCEEDED:
        update.setdefault("description", None)
    cached_update, params = _update_statement(to, update)
    postgres = conn.dialect.name == "postgresql"
    select = _SELECT_FOR_UPDATE[to] if postgres else _SELECT[to]
    if len(keys) == 1 and len(params) == len(update) and conn.in_transaction():
        # One task (a device report): the same three statements, prepared (store/prepared.py):
        # SQLAlchemy's per-execution work, an IN list expanded and an executemany cost more than
        # running them. Prepared writes need the caller's transaction, and take parameters only
        # (no SQL expressions among the values, such as attempt + 1), hence the checks.
        row = _move_one(conn, keys[0], to, cached_update, params, postgres, actor, reason, now_ms)
        if row is not None:
            moved.append(Moved(row.id, row.job_pk, row.device_id, row.module_name, row.status))
            if row.job_type == VERIFY_JOB:
                verify_jobs.add(row.job_pk)
        keys = []  # the chunked path below has nothing left to do
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start:start + _CHUNK]
        if postgres and to in (FAILED, CANCELED):
            # Lock order everywhere: a device's push row, then its task (device reports lock the
            # push row first); this move deletes the push rows below.
            conn.execute(_LOCK_PUSHES, {"p_ids": chunk}).all()
        rows = conn.execute(select, {"p_ids": chunk}).all()
        if not rows:
            continue
        # executemany of one prepared UPDATE; it repeats the allowed-from guard for races.
        conn.execute(cached_update.statement, [{**params, "p_id": row.id} for row in rows])
        conn.execute(_INSERT_EVENT, [
            {"task_pk": row.id, "from_status": row.status, "to_status": to, "actor": actor[:64],
             "reason": reason[:256] if reason else None, "at_ms": now_ms}
            for row in rows
        ])
        moved.extend(Moved(row.id, row.job_pk, row.device_id, row.module_name, row.status) for row in rows)
        verify_jobs.update(row.job_pk for row in rows if row.job_type == VERIFY_JOB)
    if not moved:
        return moved
    ids = [m.task_pk for m in moved]
    if to in (FAILED, CANCELED):
        _withdraw_pushes(conn, ids)
    if to == FAILED:
        _schedule_retries(conn, moved, now_ms, minute_ms)
    if verify_jobs:
        refresh_verification(conn, verify_jobs, now_ms)
    return moved


class _TaskRow(NamedTuple):
    id: int
    job_pk: int
    device_id: int
    module_name: str
    status: str
    job_type: str


def _move_one(conn: Connection, task_pk: int, to: str, update: _Update, params: dict[str, Any],
              postgres: bool, actor: str, reason: str | None, now_ms: int) -> _TaskRow | None:
    """`move`'s select, update and history row for one task; the task as it was, or None."""
    if postgres and to in (FAILED, CANCELED):
        _LOCK_PUSH_OF_ONE.all(conn, p_id=task_pk)  # the lock order, as in the chunked path
    if postgres:  # select, update and history row in one round trip
        found = update.pg_one.first(conn, **params, p_id=task_pk, p_to=to, p_actor=actor[:64],
                                    p_reason=reason[:256] if reason else None, p_at=now_ms)
        return None if found is None else _TaskRow(**found)
    found = _SELECT_ONE[to].first(conn, p_id=task_pk)
    if found is None:
        return None
    row = _TaskRow(**found)
    update.one.rowcount(conn, **params, p_id=row.id)
    _INSERT_ONE_EVENT.rowcount(conn, p_task=row.id, p_from=row.status, p_to=to, p_actor=actor[:64],
                               p_reason=reason[:256] if reason else None, p_at=now_ms)
    return row


def _pg_move_one(to: str, update: sa.Update) -> Prepared:
    """PostgreSQL: `_move_one` as one statement, built from the statements it merges: data-
    modifying CTEs (run once, referenced or not) lock the task if it may move, run `update` on
    it, write its history row, and return it as it was, with its job's type."""
    old = (sa.select(ota_tasks.c.id, ota_tasks.c.status)
           .where(_ONE, _status_in(ALLOWED[to]))
           .with_for_update()
           .cte("old"))
    moved = (update.where(ota_tasks.c.id == old.c.id)
             .returning(ota_tasks.c.id, ota_tasks.c.job_pk, ota_tasks.c.device_id, ota_tasks.c.module_name,
                        old.c.status.label("from_status"))
             .cte("moved"))
    events = ota_task_events.c
    history = sa.insert(ota_task_events).from_select(
        ["task_pk", "from_status", "to_status", "actor", "reason", "at_ms"],
        sa.select(moved.c.id, moved.c.from_status, sa.bindparam("p_to", type_=events.to_status.type),
                  sa.bindparam("p_actor", type_=events.actor.type), sa.bindparam("p_reason", type_=events.reason.type),
                  sa.bindparam("p_at", type_=events.at_ms.type)),
    ).cte("history")
    return Prepared(
        sa.select(moved.c.id, moved.c.job_pk, moved.c.device_id, moved.c.module_name,
                  moved.c.from_status.label("status"), ota_jobs.c.job_type)
        .join_from(moved, ota_jobs, ota_jobs.c.id == moved.c.job_pk)
        .add_cte(history)
    )


def _status_in(statuses: tuple[str, ...]) -> sa.ColumnElement:
    """`status IN ('A', 'B')` written into the SQL (constants, not parameters): executemany
    cannot expand a list parameter."""
    return ota_tasks.c.status.in_([sa.literal_column(f"'{status}'") for status in statuses])


def _select(to: str, which: sa.ColumnElement | None = None) -> sa.Select:
    """The tasks (`which`: by default those of the list `p_ids`) that may move to `to`."""
    if which is None:
        which = ota_tasks.c.id.in_(sa.bindparam("p_ids", expanding=True))
    return (sa.select(ota_tasks.c.id, ota_tasks.c.job_pk, ota_tasks.c.device_id, ota_tasks.c.module_name,
                      ota_tasks.c.status, ota_jobs.c.job_type)
            .join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
            .where(which, _status_in(ALLOWED[to])))


# Built once: a state change runs for every device report.
_SELECT = {to: _select(to) for to in ALLOWED}
# FOR UPDATE OF the tasks only: the join's job row must stay free (the dispatcher takes it with
# SKIP LOCKED, and would skip the job while any device report held it).
_SELECT_FOR_UPDATE = {to: _select(to).with_for_update(of=ota_tasks) for to in ALLOWED}
_INSERT_EVENT = sa.insert(ota_task_events)
_LOCK_PUSHES = (sa.select(pending.c.device_id).where(pending.c.task_pk.in_(sa.bindparam("p_ids", expanding=True)))
                .order_by(pending.c.device_id, pending.c.module_name).with_for_update())


class _Update(NamedTuple):
    """A task UPDATE for one target state and set of columns, in the forms `move` runs."""

    statement: sa.Update  # executemany, by p_id
    one: Prepared  # the same, for one task
    pg_one: Prepared  # PostgreSQL: select, update and history row of one task in one statement


_UPDATES: dict[tuple, _Update] = {}  # by (to, columns, expressions)
# The one-task forms (_move_one).
_ONE = ota_tasks.c.id == sa.bindparam("p_id")
_SELECT_ONE = {to: Prepared(_select(to, _ONE)) for to in ALLOWED}
_LOCK_PUSH_OF_ONE = Prepared(sa.select(pending.c.device_id).where(pending.c.task_pk == sa.bindparam("p_id"))
                             .order_by(pending.c.device_id, pending.c.module_name).with_for_update())
_INSERT_ONE_EVENT = Prepared(sa.insert(ota_task_events).values(
    task_pk=sa.bindparam("p_task"), from_status=sa.bindparam("p_from"), to_status=sa.bindparam("p_to"),
    actor=sa.bindparam("p_actor"), reason=sa.bindparam("p_reason"), at_ms=sa.bindparam("p_at")))


def _update_statement(to: str, update: Mapping[str, Any]) -> tuple[_Update, dict[str, Any]]:
    """The UPDATE for this target state and set of columns (cached), and its parameters. Values
    that are SQL expressions (attempt + 1) are part of the statement; the rest are parameters."""
    expressions = {k: v for k, v in update.items() if isinstance(v, sa.ColumnElement)}
    shape = (to, tuple(sorted(update)), tuple(sorted((k, str(v)) for k, v in expressions.items())))
    cached = _UPDATES.get(shape)
    if cached is None:
        def build() -> sa.Update:  # a fresh one per use: a statement compiled once keeps stale memos
            return (
                sa.update(ota_tasks)
                .where(ota_tasks.c.id == sa.bindparam("p_id"), _status_in(ALLOWED[to]))
                .values({k: (v if k in expressions else sa.bindparam(f"v_{k}")) for k, v in update.items()})
            )
        statement = build()
        cached = _UPDATES[shape] = _Update(statement, Prepared(statement), _pg_move_one(to, build()))
    return cached, {f"v_{k}": v for k, v in update.items() if k not in expressions}


def record_created(conn: Connection, task_pks_by_status: Mapping[str, list[int]], *, actor: str, now_ms: int,
                   reason: str | None = None) -> None:
    """History rows for newly inserted tasks (their first state)."""
    rows = [{"task_pk": pk, "from_status": None, "to_status": status, "actor": actor[:64],
             "reason": reason, "at_ms": now_ms}
            for status, pks in task_pks_by_status.items() for pk in pks]
    if rows:
        conn.execute(sa.insert(ota_task_events), rows)


def _withdraw_pushes(conn: Connection, task_pks: list[int]) -> None:
    for start in range(0, len(task_pks), _CHUNK):
        conn.execute(sa.delete(pending).where(pending.c.task_pk.in_(task_pks[start:start + _CHUNK])))


def _schedule_retries(conn: Connection, moved: list[Moved], now_ms: int, minute_ms: int) -> None:
    """A failed task with retries left becomes due again after its job's RetryInterval."""
    jobs = {m.job_pk for m in moved}
    intervals = dict(conn.execute(sa.select(ota_jobs.c.id, ota_jobs.c.retry_interval)
                                  .where(ota_jobs.c.id.in_(jobs), ota_jobs.c.retry_count.is_not(None))).all())
    for job_pk, interval in intervals.items():
        ids = [m.task_pk for m in moved if m.job_pk == job_pk]
        for start in range(0, len(ids), _CHUNK):
            conn.execute(
                sa.update(ota_tasks)
                .where(ota_tasks.c.id.in_(ids[start:start + _CHUNK]), ota_tasks.c.retries_left > 0)
                .values(due_ms=now_ms + (interval or 0) * minute_ms)
            )


def stop_retries(conn: Connection, *conditions: sa.ColumnElement) -> None:
    """Failed tasks (of the conditions) waiting for a retry will not get it: a job that ended, or
    tasks an operator cancelled, must not be pushed again by a retry scheduled before."""
    conn.execute(sa.update(ota_tasks).where(WAITING_FOR_RETRY, *conditions).values(due_ms=None))


# Where a verify task that goes with its deleted device is counted, by its status: one that had
# not finished is no success, and counts as cancelled.
_DELETED_COLUMN = {SUCCEEDED: "deleted_succeeded", FAILED: "deleted_failed"}


def count_deleted_verify_tasks(conn: Connection, device_id: int) -> None:
    """Before a device's deletion takes its tasks with it: its verify jobs keep counting them, so
    that deleting a device can never verify a package (a failure stays a failure, and a device
    that never finished is no success)."""
    query = (sa.select(ota_tasks.c.job_pk, ota_tasks.c.status)
             .join(ota_jobs, ota_jobs.c.id == ota_tasks.c.job_pk)
             .where(ota_tasks.c.device_id == device_id, ota_jobs.c.job_type == VERIFY_JOB))
    if conn.dialect.name == "postgresql":
        # A report must not move a task between this count and its deletion; the lock order:
        # the device's push rows, then its tasks.
        conn.execute(sa.select(pending.c.device_id).where(pending.c.device_id == device_id)
                     .order_by(pending.c.module_name).with_for_update()).all()
        query = query.with_for_update(of=ota_tasks)
    for job_pk, status in conn.execute(query).all():
        column = ota_jobs.c[_DELETED_COLUMN.get(status, "deleted_canceled")]
        conn.execute(sa.update(ota_jobs).where(ota_jobs.c.id == job_pk).values({column: column + 1}))


def refresh_verification(conn: Connection, job_pks: Iterable[int], now_ms: int) -> None:
    """Status and VerifyProgress of the packages whose verify jobs are among `job_pks`.
    VerifyProgress is the share of verify devices that run the DestVersion."""
    verify_jobs = conn.execute(
        sa.select(ota_jobs.c.id, ota_jobs.c.firmware_pk, ota_jobs.c.status, ota_jobs.c.deleted_succeeded,
                  ota_jobs.c.deleted_failed, ota_jobs.c.deleted_canceled)
        .where(ota_jobs.c.id.in_(sorted(set(job_pks))), ota_jobs.c.job_type == VERIFY_JOB)
    ).all()
    for job in verify_jobs:
        counts = dict(conn.execute(
            sa.select(ota_tasks.c.status, sa.func.count()).where(ota_tasks.c.job_pk == job.id)
            .group_by(ota_tasks.c.status)
        ).all())
        for status, deleted in ((SUCCEEDED, job.deleted_succeeded), (FAILED, job.deleted_failed),
                                (CANCELED, job.deleted_canceled)):
            counts[status] = counts.get(status, 0) + deleted  # the tasks of deleted devices
        total = sum(counts.values())
        succeeded = counts.get(SUCCEEDED, 0)
        if total and succeeded == total:
            status = FIRMWARE_VERIFIED
        elif counts.get(FAILED, 0):
            status = FIRMWARE_VERIFY_FAILED
        elif any(counts.get(s, 0) for s in UNFINISHED):
            status = FIRMWARE_VERIFYING
        else:  # what did not succeed was cancelled: unverified, a new verify job may start
            status = FIRMWARE_UNVERIFIED
        progress = succeeded * 100 // total if total else 0
        # Verified stays verified: another verify job of the package ending worse afterwards (or
        # a task of one re-upgraded) must not take back what jobs were already allowed on. A task
        # move that changes neither Status nor VerifyProgress leaves the package (and its
        # UtcModified) alone.
        conn.execute(sa.update(firmware)
                     .where(firmware.c.id == job.firmware_pk, firmware.c.status != FIRMWARE_VERIFIED,
                            sa.or_(firmware.c.status != status, firmware.c.verify_progress != progress))
                     .values(status=status, verify_progress=progress, modified_ms=now_ms))
