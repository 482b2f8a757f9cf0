"""What the dispatcher's once-a-second job review costs with many running jobs, on SQLite and
(with --database-url) on PostgreSQL.

The review (`Dispatcher._review_jobs`) decides, for every PLANNED and IN_PROGRESS job, whether
it ends now: its ScheduleFinishTime came, its failures passed AbortFailurePercent, a static or
verify job has nothing left to do, a scheduled static job had all its tasks cancelled. It runs
once a second in every replica, whether or not anything changed.

For each store size, in one process, without a server:
  1. a throwaway store migrated by otaplane's own Database, then filled with SQLAlchemy Core:
     one product, one package, the devices, N jobs of T tasks each, mid-rollout (the status mix
     below: nothing ends), every other job with AbortFailurePercent=50 and AbortMinimumCount=10
     (it has 1% failed tasks, so the abort rule has to count its finished tasks);
  2. the review, called back to back `--reviews` times per round, alternating between this
     tree's dispatcher and, with --compare, another tree's dispatcher.py (the same store, the
     same process): per review, wall time, this thread's CPU (SQLite's own work included, it runs
     in the thread; PostgreSQL's is not), write turns taken and the time they were held (SQLite:
     `Database.write_turn`, which every writer of the process queues on, device reports and API
     writes included; PostgreSQL: write transactions, which hold the job's row lock);
  3. with --reporter, a thread writes like device reports do (write turn, one UPDATE, commit,
     every 2 ms) while the review runs once a second, as in a server: its wait percentiles;
  4. then, with no task left QUEUED (made SUCCEEDED), the dispatch step's look for work, which
     runs every 0.1 s tick (`_dispatch_all`): median ms per tick ("idle tick").

    python bench/review.py                                   # SQLite, N = 1, 10, 50, 200 jobs of 2,000 tasks
    python bench/review.py --compare /path/to/old/src/otaplane/services/dispatcher.py
    python bench/review.py --jobs 3 --tasks 100000 --dynamic  # a few large dynamic jobs
    python bench/review.py --database-url postgresql://postgres@127.0.0.1:5432/test

Bounded: fixed counts of reviews, a throwaway database dropped on the way out. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ThrowawayPostgres, cpu_model, print_environment, print_table, require_loopback  # noqa: E402

# Share of each job's tasks per status (mid-rollout: something left to do, nothing ends).
MIX = (("SUCCEEDED", 0.40), ("FAILED", 0.01), ("IN_PROGRESS", 0.05), ("NOTIFIED", 0.04), ("QUEUED", 0.50))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 10, 50, 200], help="job counts N, one store each")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per job")
    parser.add_argument("--dynamic", action="store_true", help="dynamic jobs (they never complete) instead of static")
    parser.add_argument("--reviews", type=int, default=5, help="reviews per round and variant")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variants alternating")
    parser.add_argument("--compare", metavar="DISPATCHER_PY", help="another tree's services/dispatcher.py")
    parser.add_argument("--reporter", type=float, default=0, metavar="S",
                        help="also S seconds of reviews once a second beside a report-like writer, per variant")
    parser.add_argument("--database-url", default="", help="PostgreSQL server for a throwaway database")
    args = parser.parse_args(argv)
    if min(args.jobs) < 1 or args.tasks < 100 or args.reviews < 1 or args.rounds < 1:
        parser.error("--jobs >= 1, --tasks >= 100, --reviews and --rounds >= 1")
    if args.database_url:
        require_loopback(args.database_url)
    return args


def fill(db, jobs: int, tasks: int, dynamic: bool) -> None:
    """N jobs of `tasks` tasks, each job on its own module (a device has one unfinished task
    per module), so `tasks` devices serve every job."""
    from otaplane.store.schema import accounts, devices, firmware, instances, ota_jobs, ota_modules, ota_tasks, products
    from otaplane.timefmt import now_ms

    now = now_ms()
    with db.begin() as conn:
        def insert(table, rows):
            stmt = sa.insert(table).returning(table.c.id, sort_by_parameter_order=True)
            return conn.execute(stmt, rows).scalars().all()

        account = insert(accounts, [{"name": "bench-review", "created_ms": now}])[0]
        instance = insert(instances, [{"instance_id": "iot-bench", "account_id": account, "is_default": True,
                                       "created_ms": now}])[0]
        product = insert(products, [{
            "instance_pk": instance, "product_key": "a1benchrevw", "product_name": "bench_review",
            "product_secret_encrypted": "-", "node_type": 0, "aliyun_commodity_code": "iothub",
            "auth_type": "secret", "id2": False, "status": "DEVELOPMENT_STATUS", "created_ms": now,
            "modified_ms": now}])[0]
        module = insert(ota_modules, [{"product_id": product, "module_name": "default", "name_folded": "default",
                                       "is_default": True, "created_ms": now, "modified_ms": now}])[0]
        package = insert(firmware, [{
            "firmware_id": "benchreviewpackage", "instance_pk": instance, "product_id": product, "module_id": module,
            "name": "fw", "dest_version": "2.0.0", "type": 0, "sign_method": "Md5", "sign": "0" * 32,
            "md5": "0" * 32, "size": 1000, "blob_key": "ota/iot-bench/x.bin", "need_to_verify": False,
            "status": 0, "verify_progress": 0, "created_ms": now, "modified_ms": now}])[0]
        device_ids = []
        for start in range(0, tasks, 10_000):
            device_ids += insert(devices, [{
                "iot_id": f"bench-{i:08d}", "product_id": product, "device_name": f"dev-{i:08d}",
                "device_secret_encrypted": "-", "created_ms": now, "modified_ms": now}
                for i in range(start, min(tasks, start + 10_000))])
        statuses = []
        for status, share in MIX:
            statuses += [status] * round(tasks * share)
        statuses = (statuses + ["QUEUED"] * tasks)[:tasks]
        for j in range(jobs):
            job_pk = insert(ota_jobs, [{
                "job_id": f"bench-job-{j:05d}", "instance_pk": instance, "firmware_pk": package, "product_id": product,
                "module_name": f"m{j}", "job_type": "UPGRADE_FIRMWARE",
                "selection_type": "DYNAMIC" if dynamic else "STATIC", "target_selection": "ALL",
                "dynamic_mode": 1 if dynamic else None, "status": "IN_PROGRESS", "src_versions": [], "tags": [],
                "max_per_minute": 10_000, "timeout_minutes": None, "retry_count": None, "retry_interval": None,
                "overwrite_mode": 1, "need_push": True, "need_confirm": False, "multi_module": True,
                "download_protocol": "HTTPS", "abort_failure_percent": 50.0 if j % 2 else None,
                "abort_minimum_count": 10 if j % 2 else None, "pace_next_us": now * 1000,
                "created_ms": now, "modified_ms": now, "started_ms": now}])[0]
            for start in range(0, tasks, 10_000):
                conn.execute(sa.insert(ota_tasks), [{
                    "task_id": f"t{j:05d}-{i:08d}", "job_pk": job_pk, "device_id": device_ids[i],
                    "module_name": f"m{j}", "status": statuses[i], "progress": 0, "attempt": 1,
                    "dispatched_attempt": 1, "retries_left": 0,
                    "due_ms": now if statuses[i] == "QUEUED" else None, "created_ms": now, "modified_ms": now}
                    for i in range(start, min(tasks, start + 10_000))])
    if not db.is_sqlite:
        with db.begin() as conn:
            conn.execute(sa.text("ANALYZE"))


class TurnMeter:
    """Wraps `db.write_turn`: how many turns were taken, and for how long they were held (the
    transaction inside, commit included)."""

    def __init__(self, db):
        self._inner = db.write_turn
        self.turns = 0
        self.held_s = 0.0
        self.longest_s = 0.0
        self.owner = None  # only the reviewing thread's turns are counted
        db.write_turn = self.turn

    @contextlib.contextmanager
    def turn(self):
        with self._inner():
            started = time.perf_counter()
            try:
                yield
            finally:
                if threading.get_ident() == self.owner:
                    held = time.perf_counter() - started
                    self.turns += 1
                    self.held_s += held
                    self.longest_s = max(self.longest_s, held)


@dataclass
class Sample:
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    held_ms: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    longest_ms: float = 0.0
    report_waits_ms: list[float] = field(default_factory=list)


def review_once(dispatcher, meter: TurnMeter, sample: Sample) -> None:
    from otaplane.timefmt import now_ms

    meter.turns, meter.held_s, meter.longest_s = 0, 0.0, 0.0
    wall, cpu = time.perf_counter(), time.thread_time()
    finished = dispatcher._review_jobs(now_ms())
    sample.cpu_ms.append((time.thread_time() - cpu) * 1000)
    sample.wall_ms.append((time.perf_counter() - wall) * 1000)
    sample.held_ms.append(meter.held_s * 1000)
    sample.turns.append(meter.turns)
    sample.longest_ms = max(sample.longest_ms, meter.longest_s * 1000)
    if finished:
        raise SystemExit(f"the review ended jobs {finished[:3]}...: the store is not what the bench expects")


def with_reporter(db, dispatcher, meter: TurnMeter, sample: Sample, seconds: float) -> None:
    """Reviews once a second for `seconds` while another thread writes like a device report
    (write turn, one UPDATE, commit) every 2 ms; its waits for the turn go to the sample."""
    from otaplane.store.schema import devices

    stop = threading.Event()

    def report() -> None:
        update = sa.update(devices).where(devices.c.id == 1).values(last_seen_ms=sa.bindparam("p_now"))
        while not stop.is_set():
            asked = time.perf_counter()
            with db.write_turn():
                sample.report_waits_ms.append((time.perf_counter() - asked) * 1000)
                with db.begin() as conn:
                    conn.execute(update, {"p_now": int(time.time() * 1000)})
            time.sleep(0.002)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            review_once(dispatcher, meter, Sample())
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    finally:
        stop.set()
        reporter.join(10)


def load_dispatcher_class(path: str | None):
    if path is None:
        from otaplane.services.dispatcher import Dispatcher
        return Dispatcher
    spec = importlib.util.spec_from_file_location("bench_compared_dispatcher", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Dispatcher


def idle_ticks(db, dispatchers: dict, rounds: int, ticks: int) -> dict[str, float]:
    """The dispatch step's look for work (`_dispatch_all`, every 0.1 s tick) once no job has a
    task to push (the store's QUEUED tasks made SUCCEEDED): median ms per tick per variant."""
    from otaplane.services.dispatcher import TickResult
    from otaplane.store.schema import ota_tasks
    from otaplane.timefmt import now_ms

    with db.begin() as conn:
        conn.execute(sa.update(ota_tasks).where(ota_tasks.c.status == "QUEUED").values(status="SUCCEEDED", due_ms=None))
    times: dict[str, list[float]] = {name: [] for name in dispatchers}
    for name, dispatcher in dispatchers.items():  # warm-up
        dispatcher._dispatch_all(now_ms(), TickResult())
    for _ in range(rounds):
        for name, dispatcher in dispatchers.items():
            for _ in range(ticks):
                started = time.perf_counter()
                dispatcher._dispatch_all(now_ms(), TickResult())
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


def run_store(url: str, args, jobs: int) -> list[list[str]]:
    from otaplane.store import Database

    db = Database(url)
    try:
        db.upgrade()
        started = time.perf_counter()
        fill(db, jobs, args.tasks, args.dynamic)
        print(f"  {jobs} jobs x {args.tasks:,} tasks filled in {time.perf_counter() - started:.1f} s", flush=True)
        meter = TurnMeter(db)
        meter.owner = threading.get_ident()
        variants = [("this tree", load_dispatcher_class(None))]
        if args.compare:
            variants.insert(0, ("compared", load_dispatcher_class(args.compare)))
        samples = {name: Sample() for name, _ in variants}
        dispatchers = {name: cls(db) for name, cls in variants}
        for name in dispatchers:  # warm-up: statements compiled, pages cached
            review_once(dispatchers[name], meter, Sample())
        for _ in range(args.rounds):
            for name, dispatcher in dispatchers.items():
                for _ in range(args.reviews):
                    review_once(dispatcher, meter, samples[name])
        if args.reporter:
            for name, dispatcher in dispatchers.items():
                with_reporter(db, dispatcher, meter, samples[name], args.reporter)
        idle_tick_ms = idle_ticks(db, dispatchers, args.rounds, args.reviews)
        rows = []
        for name, sample in samples.items():
            row = [f"{jobs} x {args.tasks:,}", name, f"{statistics.median(sample.wall_ms):.1f}",
                   f"{statistics.median(sample.cpu_ms):.1f}", f"{statistics.median(sample.turns):.0f}",
                   f"{statistics.median(sample.held_ms):.1f}", f"{sample.longest_ms:.1f}",
                   f"{idle_tick_ms[name]:.2f}"]
            if args.reporter:
                waits = sample.report_waits_ms
                row += [f"{percentile(waits, 50):.2f}", f"{percentile(waits, 99):.2f}", f"{max(waits):.1f}"]
            rows.append(row)
        return rows
    finally:
        db.dispose()


def main(argv=None) -> int:
    args = parse_args(argv)
    backends = [("sqlite", None)] + ([("postgresql", args.database_url)] if args.database_url else [])
    for backend, admin_url in backends:
        kind = "dynamic" if args.dynamic else "static"
        beside = f"; then {args.reporter:g} s at 1/s beside a report every 2 ms" if args.reporter else ""
        print_environment(f"dispatcher review, {backend}, {kind} jobs", [
            ("cpu", cpu_model()),
            ("python", sys.version.split()[0]),
            ("sqlalchemy", sa.__version__),
            ("per variant", f"{args.rounds} rounds x {args.reviews} reviews back to back, alternating{beside}"),
        ])
        rows = []
        for jobs in args.jobs:
            if admin_url is None:
                with tempfile.TemporaryDirectory(prefix="scale-jobs-review-") as tmp:
                    rows += run_store(f"sqlite:///{tmp}/otaplane.db", args, jobs)
            else:
                with ThrowawayPostgres(admin_url) as url:
                    rows += run_store(url.replace("postgresql://", "postgresql+psycopg://", 1), args, jobs)
        headers = ["jobs x tasks", "dispatcher", "wall ms", "CPU ms", "turns", "turns held ms", "longest turn ms",
                   "idle tick ms"]
        if args.reporter:
            headers += ["report wait p50 ms", "p99 ms", "max ms"]
        print("per review (medians; the review runs once a second); idle tick: the dispatch step's look for "
              "work once no task is queued (every 0.1 s):")
        print_table(headers, rows)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
