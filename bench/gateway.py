"""Gateway overhead: a signed QueryProduct on `otaplane serve` against a bare Starlette endpoint.

In one run, at the same fixed concurrency and for the same time, it loads
  (a) a bare Starlette "hello" endpoint on the stack `otaplane serve` uses (bench/_hello.py:
      uvicorn, one worker, the same uvicorn options), and
  (b) a signed (V1, HMAC-SHA1) QueryProduct against a real `otaplane serve` process (one
      worker, embedded SQLite or --database-url PostgreSQL, --rate-limit 0),
and prints requests/s, p50 and p99 latency of each and the ratio (b)/(a) of requests/s.
Target: (b) >= 40% of (a) on one worker.

Each signed request carries its own SignatureNonce (the server refuses replays), so the
requests are signed before the timed window, from the official util when installed.

    python bench/gateway.py                       # wrk when installed, else the Python client
    python bench/gateway.py --duration 30 --connections 64
    python bench/gateway.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as common

TARGET_RATIO = 0.40
PRODUCT_NAME = "bench_gateway_product"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Signed QueryProduct on otaplane serve vs a bare Starlette endpoint (same stack).",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="timed seconds per target [10]")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="warm-up seconds per target, at least 1 (it also sizes the signed pool) [2]")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections [32]")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads [1]")
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk, the built-in Python client, or wrk when installed [auto]")
    parser.add_argument("--database-url", default="",
                        help="run (b) on PostgreSQL: a throwaway database is created on this server "
                             "and dropped afterwards (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed rounds, alternating (a) and (b); the ratio is their median [1]")
    parser.add_argument("--pool", type=int, default=0,
                        help="pre-signed requests per timed round of (b) [0 = sized from the warm-up]")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when (b)/(a) is below the target ({TARGET_RATIO:.0%}%)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or min(args.connections, args.threads, args.rounds) < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --connections, --threads and --rounds >= 1")
    if args.duration > 600:
        parser.error("keep --duration within 600 s (the signatures of a round expire after 900 s)")
    if args.tool == "auto":
        args.tool = "wrk" if common.wrk_binary() else "python"
    elif args.tool == "wrk" and not common.wrk_binary():
        parser.error("wrk is not installed (apt-get install wrk), use --tool python")
    if args.database_url:
        common.require_loopback(args.database_url)
    return args


def pool_size(rate_per_s: float, seconds: float, headroom: float) -> int:
    """Pre-signed requests for `seconds` at `rate_per_s`, times `headroom`."""
    return max(2000, math.ceil(rate_per_s * seconds * headroom))


class SignedTarget:
    """(b): a real `otaplane serve` with one product, and fresh pre-signed QueryProducts."""

    def __init__(self, workdir: Path, database_url: str, backend: str):
        self.label = f"(b) signed QueryProduct ({backend})"
        self.server = common.otaplane_server(workdir, database_url, "--rate-limit", "0")
        self.workdir = workdir

    def start(self) -> "SignedTarget":
        self.server.start()
        base_url = self.server.base_url
        self.key = common.admin_credentials(self.workdir)
        status, body = common.call(base_url, self.key, "CreateProduct",
                                   {"ProductName": PRODUCT_NAME, "NodeType": "0"}, method="POST")
        if status != 200 or not body.get("Success"):
            raise RuntimeError(f"CreateProduct failed: HTTP {status} {body}")
        self.query = {"ProductKey": body["ProductKey"]}
        status, body = common.call(base_url, self.key, "QueryProduct", self.query)
        if status != 200 or not body.get("Success") or body["Data"]["ProductName"] != PRODUCT_NAME:
            raise RuntimeError(f"QueryProduct check failed: HTTP {status} {body}")
        return self

    def presign(self, count: int) -> list[str]:
        started = time.perf_counter()
        paths = common.presign_paths(self.key, "QueryProduct", self.query, count)
        print(f"    pre-signed {count} QueryProduct requests in {time.perf_counter() - started:.1f} s "
              f"({common.RPC_SIGNER_NAME})", file=sys.stderr)
        return paths

    def stop(self) -> None:
        self.server.stop()
        log = self.server.logs(tail=5)
        if any(word in log for word in ("ERROR", "Traceback")):  # a failed request says why there
            print(f"  last lines of the otaplane log:\n{log}", file=sys.stderr)


def run(args, spec: common.LoadSpec, workdir: Path, database_url: str, backend: str):
    """[(bare, signed) per round], warm-ups first; the servers stay up for all rounds."""
    tool = args.tool
    hello = common.hello_server(workdir)
    signed = SignedTarget(workdir, database_url, backend)
    try:
        hello.start()
        signed.start()
        bare_label = "(a) bare Starlette hello"
        warmup_s = max(1.0, spec.warmup_s)
        print(f"  warm-up {warmup_s:g} s each ...", file=sys.stderr)
        bare_rate = common.run_phase(tool, bare_label, hello.base_url, spec, warmup_s, workdir).rps
        # (b) cannot outrun (a) on the same stack: the warm-up's pool is sized from (a)'s rate,
        # the timed pools from (b)'s own warm-up (and later rounds), with headroom.
        warm = common.run_phase(tool, signed.label, signed.server.base_url, spec, warmup_s, workdir,
                                paths=signed.presign(pool_size(bare_rate, warmup_s, 1.25)))
        signed_rate = warm.rps
        rounds = []
        for number in range(1, args.rounds + 1):
            print(f"  round {number}/{args.rounds}: {spec.duration_s:g} s each ...", file=sys.stderr)
            bare = common.run_phase(tool, bare_label, hello.base_url, spec, spec.duration_s, workdir)
            count = args.pool or pool_size(min(bare.rps, signed_rate * 2), spec.duration_s, 1.25)
            result = common.run_phase(tool, signed.label, signed.server.base_url, spec, spec.duration_s, workdir,
                                      paths=signed.presign(count))
            signed_rate = max(signed_rate, result.rps)
            rounds.append((bare, result))
        return rounds
    finally:
        hello.stop()
        signed.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = common.LoadSpec(args.connections, args.duration, args.warmup, args.threads)
    backend = "postgresql" if args.database_url else "sqlite"

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otaplane-bench-")))
        if args.database_url:
            postgres = common.ThrowawayPostgres(args.database_url)
            database_url = stack.enter_context(postgres)
            db_line = f"PostgreSQL {postgres.server_version} (throwaway database, dropped after)"
        else:
            database_url = ""
            db_line = f"SQLite {sqlite3.sqlite_version} (embedded, WAL)"
        rounds = run(args, spec, workdir, database_url, backend)

    ratios = [signed.rps / bare.rps if bare.rps else 0.0 for bare, signed in rounds]
    ratio = statistics.median(ratios)
    extra = [("otaplane", f"{common._version('otaplane')}, one worker, rate limit off, database {db_line}"),
             ("sqlalchemy", common._version("sqlalchemy")),
             ("signer", f"{common.RPC_SIGNER_NAME} (V1, HMAC-SHA1; requests signed before the timed window)")]
    environment = common.environment(args.tool, spec, extra, args.rounds)
    print()
    common.print_environment("otaplane gateway benchmark", environment)
    rows = []
    for number, pair in enumerate(rounds, 1):
        for result in pair:
            errors = str(result.errors) + (" (pool ran out: raise --pool)" if result.exhausted else "")
            rows.append([result.label, str(number), f"{result.requests}", f"{result.rps:,.0f}",
                         f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}", errors])
    rows.append(["(b)/(a) req/s" + (" (median of rounds)" if len(rounds) > 1 else ""), "", "",
                 f"{ratio:.1%}", "", "", ""])
    common.print_table(["target", "round", "requests", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    if len(rounds) > 1:
        print("(b)/(a) per round: " + ", ".join(f"{r:.1%}" for r in ratios))
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"\ntarget: signed QueryProduct >= {TARGET_RATIO:.0%} of the bare endpoint's req/s: {verdict}")

    if args.json:
        args.json.write_text(json.dumps({
            "environment": dict(environment),
            "rounds": [
                [{"target": r.label, "requests": r.requests, "duration_s": r.duration_s, "rps": r.rps,
                  "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "pool_exhausted": r.exhausted}
                 for r in pair]
                for pair in rounds
            ],
            "ratios": ratios,
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
        }, indent=2) + "\n")
    if any(r.errors or r.exhausted for pair in rounds for r in pair):
        print("warning: some requests failed; the numbers above are not trustworthy", file=sys.stderr)
        return 2
    return 1 if args.check and ratio < TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
