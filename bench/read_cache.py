"""What a busy database does to QueryOTAFirmware on SQLite: the read cache under writes.

otaplane's loop reads keep their results until a table they read changes (store.read_versions:
per-table change counters kept by triggers). In one run, on loopback, one `otaplane serve` with
--store packages answers signed QueryOTAFirmware requests at 32 connections (wrk), each for a
package drawn at random from the whole store (signed with its own account's key: all of them fit
in the read cache when nothing writes), while a writer thread, with its own SQLite connection on
the same file, commits at a fixed rate:

  (a) no writer: the quiet baseline;
  (b) a device's row updated (what a fleet's connects and reports do): QueryOTAFirmware reads
      no devices, so its cached packages stay;
  (c) a package's row updated: the query reads that table, so its cached results go at every
      commit (what every commit did before the per-table counters).

The three alternate over --rounds; the figure is each one's req/s against (a) of the same round.

    python bench/read_cache.py                  # about 2 minutes
    python bench/read_cache.py --writes 1000 --rounds 4
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as common
import firmware as fw

WRITERS = ("no writer", "device rows", "package rows")


class Writer(threading.Thread):
    """Commits one UPDATE `rate` times a second on its own connection until stopped."""

    def __init__(self, db_path: str, statement: str, rate: float):
        super().__init__(daemon=True)
        self.db_path, self.statement, self.interval = db_path, statement, 1 / rate
        self.stopped = threading.Event()
        self.commits = 0
        self.seconds = 0.0

    @property
    def rate(self) -> float:
        return self.commits / self.seconds if self.seconds else 0.0

    def run(self) -> None:
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        started = next_at = time.perf_counter()
        while not self.stopped.is_set():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(self.statement, (int(time.time() * 1000),))
            conn.execute("COMMIT")
            self.commits += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
        self.seconds = time.perf_counter() - started
        conn.close()


def add_device(db_path: str) -> int:
    """A device row of the first filler product, for the writer to update."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        product_id = conn.execute("SELECT id FROM products ORDER BY id LIMIT 1").fetchone()[0]
        conn.execute("INSERT INTO devices (iot_id, product_id, device_name, device_secret_encrypted, created_ms, "
                     "modified_ms) VALUES ('bench-device', ?, 'bench-device', 'x', 0, 0)", (product_id,))
        return conn.execute("SELECT id FROM devices WHERE iot_id = 'bench-device'").fetchone()[0]
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=int, default=1000, help="packages in the store [1000]")
    parser.add_argument("--writes", type=float, default=200, help="writer commits per second [200]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the writers alternating [3]")
    parser.add_argument("--duration", type=float, default=5, help="timed seconds per phase [5]")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--one-package", action="store_true",
                        help="query the one uploaded package every time instead of a random one")
    args = parser.parse_args(argv)
    if common.wrk_binary() is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="otaplane-read-cache-") as tmp:
        workdir = Path(tmp)
        small = workdir / "small.bin"
        fw.write_random_file(small, fw.SMALL_PACKAGE_BYTES)
        store = fw.PackageStore(workdir, "", args.store, [("small", small)]).start()
        db_path = store.sa_url.removeprefix("sqlite:///")
        device_id = add_device(db_path)
        other_package = store.targets[0][1]
        statements = {
            "device rows": f"UPDATE devices SET last_seen_ms = ? WHERE id = {device_id}",
            "package rows": f"UPDATE firmware SET modified_ms = ? WHERE firmware_id = '{other_package}'",
        }
        spec = common.LoadSpec(args.connections, args.duration, 1.0, 2)
        results: dict[str, list[tuple[int, common.LoadResult, float]]] = {name: [] for name in WRITERS}
        rng = random.Random(1)

        def requests(count: int) -> list[str]:
            return store.presign("small", count) if args.one_package else store.presign_spread(count, rng)

        try:
            warm = common.run_phase("wrk", "warm-up", store.server.base_url, spec, 2, workdir, paths=requests(40_000))
            pool = fw.pool_size(warm.rps, args.duration, 2.0)
            for number in range(1, args.rounds + 1):
                order = list(WRITERS)
                rng.shuffle(order)
                fw.log(f"  round {number}/{args.rounds}: {', '.join(order)}")
                for name in order:
                    writer = Writer(db_path, statements[name], args.writes) if name in statements else None
                    if writer:
                        writer.start()
                    result = common.run_phase("wrk", name, store.server.base_url, spec, args.duration, workdir,
                                              paths=requests(pool))
                    rate = 0.0
                    if writer:
                        writer.stopped.set()
                        writer.join()
                        rate = writer.rate
                    results[name].append((number, result, rate))
        finally:
            store.stop()

    common.print_environment("QueryOTAFirmware under writes (bench/read_cache.py)", [
        ("store", f"{args.store:,} packages, SQLite, one `otaplane serve`, rate limit off"),
        ("load", f"wrk, {args.connections} connections, {args.duration:g} s per phase, {args.rounds} rounds"),
        ("request", "QueryOTAFirmware, " + ("the one uploaded package" if args.one_package
                                           else "a package drawn at random from the whole store")),
        ("writer", f"{args.writes:g} commits/s target, its own sqlite3 connection, BEGIN IMMEDIATE"),
    ])
    rows = []
    for name in WRITERS:
        for number, result, rate in results[name]:
            quiet = next(r for n, r, _ in results["no writer"] if n == number)
            rows.append([name, str(number), f"{result.rps:,.0f}", f"{rate:,.0f}",
                         f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}", f"{result.rps / quiet.rps:.1%}",
                         str(result.errors)])
    common.print_table(["writer", "round", "req/s", "commits/s", "p50 ms", "p99 ms", "vs (a)", "errors"], rows)
    print()
    summary = []
    for name in WRITERS:
        ratios = [r.rps / next(q for n, q, _ in results["no writer"] if n == number).rps
                  for number, r, _ in results[name]]
        p50s = [r.p50_ms for _, r, _ in results[name]]
        summary.append([name, f"{statistics.median(ratios):.1%}", f"{statistics.median(p50s):.2f}"])
    common.print_table(["writer (medians of the rounds)", "req/s vs no writer", "p50 ms"], summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
