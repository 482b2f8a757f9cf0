"""The job dispatcher: what happens to jobs and tasks as time passes.

Each `tick` starts PLANNED jobs whose ScheduleTime came, ends jobs at their ScheduleFinishTime,
fails tasks past their timeout, re-queues failed tasks whose retry is due, sends out due tasks at
each job's pace, and completes (or, past their failure threshold, stops) jobs. All of it is
driven by times stored in the database, so a restarted process picks up exactly where the
database says things are, and several processes may tick at once:

- every state change is a guarded UPDATE (task_flow.move), so only one process wins it;
- a job is paced and dispatched under its row lock (PostgreSQL: FOR UPDATE SKIP LOCKED, a
  process skips a job another one is dispatching), and a task is claimed by an UPDATE that only
  matches while it is still undispatched, in the same transaction as its push row.

Dispatching a task writes its push (device_ota_pending) with a fresh message id and clears the
task's due time, in one commit: after a crash the push is either there (the device channel
delivers it, once) or not (the task is still due). The task becomes NOTIFIED when the device
takes the push.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from otaplane.services import jobs as job_rules
from otaplane.services import task_flow
from otaplane.services.device_ota import new_message_id
from otaplane.store import Database
from otaplane.store import device_ota as pending_store
from otaplane.store import jobs as store
from otaplane.store.prepared import Prepared
from otaplane.store.schema import device_modules, ota_jobs, ota_tasks
from otaplane.timefmt import now_ms as clock_ms

log = logging.getLogger("otaplane.dispatcher")

BATCH = 500  # most tasks moved per step and transaction
MAX_PACE_BANK_US = 1_000_000  # an idle job may catch up at most one second of pushes at once
ACTOR = "dispatcher"

# The jobs whose tasks are served (pushed, retried): running ones, and dynamic jobs whose strategy
# was cancelled (CancelOTAStrategyByJob: CANCELED, no new devices, but the tasks it made go on).
def _served(status, selection_type):
    return sa.or_(status == sa.bindparam("p_running"),
                  sa.and_(status == sa.bindparam("p_cancelled"), selection_type == sa.bindparam("p_dynamic")))


def _is_served(status: str, selection_type: str) -> bool:
    return status == job_rules.IN_PROGRESS or (status == job_rules.CANCELED and selection_type == job_rules.DYNAMIC)


_SERVED_PARAMS = {"p_running": job_rules.IN_PROGRESS, "p_cancelled": job_rules.CANCELED,
                  "p_dynamic": job_rules.DYNAMIC}
# The served jobs with a free pace slot and a QUEUED task that is due, in one statement per tick:
# one probe of ix_ota_tasks_job_status (job_pk, status, due_ms) per such job, not one round trip
# each (every running job, dynamic ones included, every 0.1 s: on PostgreSQL 50 idle dynamic jobs
# were 500 round trips a second). The probe is the smallest due_ms of the range, which both
# databases read from the index's first entry (min/max optimisation), not EXISTS, which
# PostgreSQL may plan as a scan of the tasks table (see _has_task below).
_FIRST_DUE_TASK = (
    sa.select(sa.func.min(ota_tasks.c.due_ms))
    .where(ota_tasks.c.job_pk == ota_jobs.c.id, ota_tasks.c.status == sa.bindparam("p_status"),
           ota_tasks.c.due_ms <= sa.bindparam("p_now"))
    .scalar_subquery()
)
_READY_JOBS = Prepared(sa.select(ota_jobs.c.id)
                       .where(_served(ota_jobs.c.status, ota_jobs.c.selection_type),
                              ota_jobs.c.pace_next_us <= sa.bindparam("p_now_us"), _FIRST_DUE_TASK.is_not(None))
                       .order_by(ota_jobs.c.id))

# Claims one task (executemany): only while it is QUEUED and not yet dispatched (due_ms set).
# The version the device runs as it is pushed (it may have changed since the task was made):
# a version report equal to it means "not upgraded yet" (services/device_ota.py).
_RUNNING_VERSION = (
    sa.select(device_modules.c.version)
    .where(device_modules.c.device_id == ota_tasks.c.device_id, device_modules.c.module_name == ota_tasks.c.module_name)
    .scalar_subquery()
)
_CLAIM = (
    sa.update(ota_tasks)
    .where(ota_tasks.c.id == sa.bindparam("p_id"), ota_tasks.c.status == task_flow.QUEUED,
           ota_tasks.c.due_ms.is_not(None))
    .values(due_ms=None, dispatched_attempt=sa.bindparam("p_attempt"), message_id=sa.bindparam("p_message"),
            modified_ms=sa.bindparam("p_now"), src_version=sa.func.coalesce(_RUNNING_VERSION, ota_tasks.c.src_version))
)


@dataclass
class TickResult:
    dispatched: int = 0
    timed_out: int = 0
    retried: int = 0
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    pushed_devices: list[int] = field(default_factory=list)


class Dispatcher:
    def __init__(self, db: Database, minute_ms: int = 60_000,
                 on_pushed: Callable[[list[int]], None] | None = None):
        self.db = db
        self.minute_ms = minute_ms
        self.on_pushed = on_pushed  # wakes the device channel after pushes commit
        self._is_pg = not db.is_sqlite
        self._last_review_ms = 0
        # Totals for operators and bench/rollout.py (logged when a job ends).
        self.cpu_seconds = 0.0
        self.dispatched_total = 0

    def tick(self, now_ms: int | None = None, review_every_ms: int = 1000) -> TickResult:
        started_cpu = time.thread_time()
        try:
            return self._tick(now_ms, review_every_ms)
        finally:
            self.cpu_seconds += time.thread_time() - started_cpu

    def _tick(self, now_ms: int | None, review_every_ms: int) -> TickResult:
        now = clock_ms() if now_ms is None else now_ms
        result = TickResult()
        # Schedules, timeouts and retries need second precision, not tick precision: they run
        # with the review, and dispatch (which has a pace to keep) runs every tick.
        review = now - self._last_review_ms >= review_every_ms or now < self._last_review_ms
        if review:
            self._last_review_ms = now
            result.started = self._start_planned(now)
            result.timed_out = self._time_out(now)
            result.retried = self._retry(now)
        self._dispatch_all(now, result)
        if review:
            result.finished = self._review_jobs(now)
        self.dispatched_total += result.dispatched
        if result.pushed_devices and self.on_pushed is not None:
            self.on_pushed(result.pushed_devices)
        return result

    # --- time-driven job changes ----------------------------------------------------------------
    def _start_planned(self, now: int) -> list[str]:
        with self.db.connect() as conn:
            due = conn.execute(sa.select(ota_jobs.c.id, ota_jobs.c.job_id).where(
                ota_jobs.c.status == job_rules.PLANNED, ota_jobs.c.schedule_ms <= now)).all()
        if not due:
            return []
        started = []
        with self.db.write_turn(), self.db.begin() as conn:
            for job in due:
                changed = conn.execute(
                    sa.update(ota_jobs).where(ota_jobs.c.id == job.id, ota_jobs.c.status == job_rules.PLANNED)
                    .values(status=job_rules.IN_PROGRESS, started_ms=now, modified_ms=now, pace_next_us=now * 1000)
                ).rowcount
                if changed:
                    started.append(job.job_id)
        for job_id in started:
            log.info("job %s: its ScheduleTime came; started", job_id)
        return started

    def _time_out(self, now: int) -> int:
        late_query = sa.select(ota_tasks.c.id).where(ota_tasks.c.deadline_ms <= now,
                                                     ota_tasks.c.status == task_flow.IN_PROGRESS).limit(BATCH)
        with self.db.connect() as conn:  # the common case, nothing late, takes no write turn
            if not conn.execute(late_query).first():
                return 0
        with self.db.write_turn(), self.db.begin() as conn:
            late = conn.execute(late_query).scalars().all()
            moved = task_flow.move(conn, late, task_flow.FAILED, actor=ACTOR, now_ms=now,
                                   reason="upgrade timed out", minute_ms=self.minute_ms)
        return len(moved)

    def _retry(self, now: int) -> int:
        # Driven from the running jobs: the (job_pk, status, due_ms) index finds their due retries.
        due_query = (
            sa.select(ota_tasks.c.id, ota_tasks.c.device_id, ota_tasks.c.module_name, ota_jobs.c.multi_module)
            .select_from(ota_jobs)
            .join(ota_tasks, ota_tasks.c.job_pk == ota_jobs.c.id)
            .where(_served(ota_jobs.c.status, ota_jobs.c.selection_type), ota_tasks.c.status == task_flow.FAILED,
                   ota_tasks.c.due_ms <= now, ota_tasks.c.retries_left > 0)
            .limit(BATCH)
            .params(**_SERVED_PARAMS)
        )
        with self.db.connect() as conn:
            if not conn.execute(due_query).first():
                return 0
        with self.db.write_turn(), self.db.begin() as conn:
            due = conn.execute(due_query).all()
            if not due:
                return 0
            busy: set[int] = set()  # ids of the due tasks whose device took another task meanwhile
            for module, multi in {(row.module_name, row.multi_module) for row in due}:
                rows = [r for r in due if (r.module_name, r.multi_module) == (module, multi)]
                taken = store.unfinished_by_device(conn, [r.device_id for r in rows], module, multi)
                busy |= {r.id for r in rows if r.device_id in taken}
            blocked = [row.id for row in due if row.id in busy]
            if blocked:  # another job took the device meanwhile: no retry
                conn.execute(sa.update(ota_tasks).where(ota_tasks.c.id.in_(blocked))
                             .values(due_ms=None, description="retry skipped: the device has another task"))
            moved = task_flow.move(
                conn, [row.id for row in due if row.id not in busy], task_flow.QUEUED, actor=ACTOR,
                now_ms=now, reason="retry", minute_ms=self.minute_ms,
                values={"attempt": ota_tasks.c.attempt + 1, "retries_left": ota_tasks.c.retries_left - 1,
                        "due_ms": now, "progress": 0},
            )
        return len(moved)

    # --- dispatch -------------------------------------------------------------------------------
    def _dispatch_all(self, now: int, result: TickResult) -> None:
        """Jobs with a free pace slot and a due task; only those take a write turn."""
        now_us = now * 1000
        with self.db.connect() as conn:  # every tick: a lean statement (store/prepared.py)
            ready = [job["id"] for job in _READY_JOBS.all(conn, **_SERVED_PARAMS, p_now_us=now_us,
                                                          p_status=task_flow.QUEUED, p_now=now)]
        for job_pk in ready:
            try:
                self._dispatch_job(job_pk, now, result)
            except Exception:  # one job's trouble must not stop the others
                log.exception("dispatch of job %d failed", job_pk)

    def _dispatch_job(self, job_pk: int, now: int, result: TickResult) -> None:
        now_us = now * 1000
        with self.db.write_turn(), self.db.begin() as conn:
            query = sa.select(ota_jobs.c.status, ota_jobs.c.selection_type, ota_jobs.c.max_per_minute,
                              ota_jobs.c.pace_next_us, ota_jobs.c.need_push, ota_jobs.c.firmware_pk
                              ).where(ota_jobs.c.id == job_pk)
            if self._is_pg:
                query = query.with_for_update(skip_locked=True)
            job = conn.execute(query).first()
            if job is None or not _is_served(job.status, job.selection_type):
                return  # gone, finished, or another process holds it right now
            interval_us = job_rules.pace_interval_us(job.max_per_minute)
            cursor = max(job.pace_next_us, now_us - MAX_PACE_BANK_US)
            if cursor > now_us:
                return
            slots = min(BATCH, int((now_us - cursor) // interval_us) + 1)
            tasks_query = (
                sa.select(ota_tasks.c.id, ota_tasks.c.device_id, ota_tasks.c.module_name, ota_tasks.c.attempt)
                .where(ota_tasks.c.job_pk == job_pk, ota_tasks.c.status == task_flow.QUEUED,
                       ota_tasks.c.due_ms <= now)
                .order_by(ota_tasks.c.due_ms, ota_tasks.c.id).limit(slots)
            )
            if self._is_pg:
                tasks_query = tasks_query.with_for_update(skip_locked=True)
            tasks = conn.execute(tasks_query).all()
            claimed = self._claim(conn, tasks, now)
            pending_store.upsert_many(conn, [
                pending_store.pending_row(task.device_id, task.module_name, job.firmware_pk, message_id, now,
                                          task_pk=task.id, push=job.need_push)
                for task, message_id in claimed
            ])
            if claimed:
                conn.execute(sa.update(ota_jobs).where(ota_jobs.c.id == job_pk)
                             .values(pace_next_us=int(cursor + len(claimed) * interval_us)))
        result.dispatched += len(claimed)
        if job.need_push:
            result.pushed_devices.extend(task.device_id for task, _ in claimed)

    @staticmethod
    def _claim(conn, tasks, now: int) -> list[tuple]:
        """Take the tasks for this attempt: each gets a fresh push id, only if still undispatched
        (the UPDATE's guard); a task another process took meanwhile keeps that one's id."""
        if not tasks:
            return []
        offered = {task.id: (task, new_message_id()) for task in tasks}
        conn.execute(_CLAIM, [{"p_id": task.id, "p_attempt": task.attempt, "p_message": message_id, "p_now": now}
                              for task, message_id in offered.values()])
        won = conn.execute(sa.select(ota_tasks.c.id, ota_tasks.c.message_id)
                           .where(ota_tasks.c.id.in_(list(offered)))).all()
        return [offered[row.id] for row in won if row.message_id == offered[row.id][1]]

    # --- job completion -------------------------------------------------------------------------
    def _review_jobs(self, now: int) -> list[str]:
        """End jobs: at ScheduleFinishTime; when a failure threshold is passed; when a static
        or verify job has nothing left to do.

        It runs every second in every process. Which jobs may end is read first, outside any
        write turn or write transaction: one statement with index probes per job (_MAY_END), and for
        a job with an abort threshold a count of its failures (_may_abort). Only a job that may
        end takes a write turn, in which `_review` decides under the job's lock from full counts,
        as it always has: the outcomes are those of reviewing every job that way, while a job
        that cannot end (tasks left, failures below its threshold) holds no write turn (on
        SQLite every writer of the process queues on it: device reports, API writes) and
        counts none of its tasks (bench/review.py)."""
        finished = []
        with self.db.connect() as conn:
            jobs = conn.execute(_MAY_END).all()
            candidates = []
            for job in jobs:
                try:
                    if self._may_end(conn, job, now):
                        candidates.append(job)
                except Exception:
                    log.exception("review of job %s failed", job.job_id)
        for job in candidates:
            try:
                outcome = self._review(job, now)
            except Exception:
                log.exception("review of job %s failed", job.job_id)
                continue
            if outcome:
                finished.append(job.job_id)
                log.info("job %s: %s (this process's dispatcher so far: %d tasks dispatched, %.3f s CPU)",
                         job.job_id, outcome, self.dispatched_total, self.cpu_seconds)
        return finished

    @staticmethod
    def _may_end(conn, job, now: int) -> bool:
        """Whether `_review` could end the job now, from reads outside any write transaction:
        never false where `_review`, reading the same rows, would end it."""
        if job.schedule_finish_ms is not None and job.schedule_finish_ms <= now:
            return True
        if job.status != job_rules.IN_PROGRESS:  # PLANNED: a static job whose tasks were all cancelled
            return job.selection_type == job_rules.STATIC and job.has_task and not job.has_unfinished
        if job.abort_failure_percent is not None and _may_abort(conn, job):
            return True
        return job.selection_type != job_rules.DYNAMIC and not job.has_unfinished and not job.has_retry

    def _review(self, job, now: int) -> str | None:
        with self.db.write_turn(), self.db.begin() as conn:
            query = sa.select(ota_jobs.c.status).where(ota_jobs.c.id == job.id)
            if self._is_pg:
                query = query.with_for_update(skip_locked=True)
            status = conn.execute(query).scalar()
            if status not in (job_rules.PLANNED, job_rules.IN_PROGRESS):
                return None
            if job.schedule_finish_ms is not None and job.schedule_finish_ms <= now:
                self._end(conn, job.id, job_rules.COMPLETED, now, "its ScheduleFinishTime came; unfinished tasks "
                          "were cancelled", cancel_reason="the job's ScheduleFinishTime passed")
                return "ScheduleFinishTime reached"
            counts = store.status_counts(conn, job.id)
            if status != job_rules.IN_PROGRESS:
                # A scheduled static job whose tasks were all cancelled (CancelScheduledTask) has
                # nothing left to start: it ends now, not as an empty run at its ScheduleTime.
                if job.selection_type == job_rules.STATIC and counts and not _unfinished(counts):
                    store.update_job(conn, job.id, {"status": job_rules.COMPLETED, "ended_ms": now, "modified_ms": now})
                    return "completed before its ScheduleTime: every task was cancelled"
                return None
            retrying = store.retry_pending(conn, job.id)
            failed = counts.get(task_flow.FAILED, 0) - retrying
            if job.abort_failure_percent is not None:
                finished = counts.get(task_flow.SUCCEEDED, 0) + failed
                share = failed * 100.0 / finished if finished else 0.0
                if failed >= (job.abort_minimum_count or 1) and share >= job.abort_failure_percent:
                    why = (f"stopped: {failed} of {finished} finished tasks failed ({share:.1f}% >= "
                           f"AbortFailurePercent {job.abort_failure_percent:g})")
                    self._end(conn, job.id, job_rules.CANCELED, now, why, cancel_reason="the rollout was " + why)
                    return why
            if job.selection_type == job_rules.DYNAMIC:
                return None  # a dynamic job runs until cancelled or its finish time
            if not _unfinished(counts) and retrying == 0:
                store.update_job(conn, job.id, {"status": job_rules.COMPLETED, "ended_ms": now, "modified_ms": now})
                return "completed"
        return None

    def _end(self, conn, job_pk: int, status: str, now: int, description: str, cancel_reason: str) -> None:
        task_pks = store.task_ids_of_job(conn, job_pk, task_flow.UNFINISHED)
        task_flow.move(conn, task_pks, task_flow.CANCELED, actor=ACTOR, now_ms=now, reason=cancel_reason,
                       minute_ms=self.minute_ms)
        task_flow.stop_retries(conn, ota_tasks.c.job_pk == job_pk)
        store.update_job(conn, job_pk, {"status": status, "ended_ms": now, "modified_ms": now,
                                        "description": description[:256]})


def _may_abort(conn, job) -> bool:
    """Whether the job's failures pass its AbortFailurePercent (`_review`'s rule), counting its
    FAILED tasks and at most as many SUCCEEDED ones as can matter: beyond
    `failed * 100 / percent` finished tasks the share is below the threshold whatever the rest,
    so a large healthy job costs a count of its failures, not of all its tasks."""
    failed, retrying = conn.execute(_FAILED_COUNTS, {"p_job": job.id}).one()
    failed = (failed or 0) - (retrying or 0)
    if failed < (job.abort_minimum_count or 1):
        return False
    percent = job.abort_failure_percent
    if percent <= 0:
        return True  # any share passes
    cap = math.ceil(failed * 100 / percent) + 1  # more succeeded than this: the share is below
    succeeded = conn.execute(_SUCCEEDED_UP_TO, {"p_job": job.id, "p_cap": cap}).scalar_one()
    # The same formula as _review; a count cut at `cap` can only make the share larger, and then
    # still leaves it below the threshold.
    return failed * 100.0 / (succeeded + failed) >= percent


def _has_task(*conditions, order_by=(ota_tasks.c.due_ms,)) -> sa.ColumnElement:
    """Whether the reviewed job has a task meeting the conditions: the first one in the order
    of ix_ota_tasks_job_status (job_pk, status, due_ms). Not EXISTS: PostgreSQL plans an EXISTS
    over many matching rows as a sequential scan that stops at the first match, which for tasks
    stored job after job reads most of the table (50 jobs of 2,000 tasks: 150 ms); the order
    asked for leaves the index as the only cheap way, a probe, on either database."""
    return (sa.select(sa.literal_column("1")).where(ota_tasks.c.job_pk == ota_jobs.c.id, *conditions)
            .order_by(*order_by).limit(1).scalar_subquery().is_not(None))


# The reviewed jobs, with what decides whether they may end: index probes, not counts.
_MAY_END = (
    sa.select(ota_jobs.c.id, ota_jobs.c.job_id, ota_jobs.c.status, ota_jobs.c.selection_type,
              ota_jobs.c.schedule_finish_ms, ota_jobs.c.abort_failure_percent, ota_jobs.c.abort_minimum_count,
              _has_task(order_by=(ota_tasks.c.status, ota_tasks.c.due_ms)).label("has_task"),
              sa.or_(*(_has_task(ota_tasks.c.status == status) for status in task_flow.UNFINISHED))
              .label("has_unfinished"),
              _has_task(store.RETRY_PENDING).label("has_retry"))
    .where(ota_jobs.c.status.in_((job_rules.PLANNED, job_rules.IN_PROGRESS)))
    .order_by(ota_jobs.c.id)
)
# A job's FAILED tasks, and those of them waiting for a retry (store.retry_pending's condition).
_FAILED_COUNTS = sa.select(
    sa.func.count(),
    sa.func.sum(sa.case((store.RETRY_PENDING, 1), else_=0)),
).where(ota_tasks.c.job_pk == sa.bindparam("p_job"), ota_tasks.c.status == task_flow.FAILED)
# Up to p_cap of a job's SUCCEEDED tasks, in index order (see _has_task).
_SUCCEEDED_UP_TO = sa.select(sa.func.count()).select_from(
    sa.select(sa.literal_column("1").label("one"))
    .where(ota_tasks.c.job_pk == sa.bindparam("p_job"), ota_tasks.c.status == task_flow.SUCCEEDED)
    .order_by(ota_tasks.c.due_ms).limit(sa.bindparam("p_cap", type_=sa.Integer)).subquery())


def _unfinished(counts: dict[str, int]) -> int:
    """How many of a job's tasks are not finished, from its counts per status."""
    return sum(counts.get(status, 0) for status in task_flow.UNFINISHED)
