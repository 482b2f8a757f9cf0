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
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target [2]")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections [32]")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads [1]")
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk, the built-in Python client, or wrk when installed [auto]")
    parser.add_argument("--database-url", default="",
                        help="run (b) on PostgreSQL: a throwaway database is created on this server "
                             "and dropped afterwards (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    parser.add_argument("--pool", type=int, default=0,
                        help="pre-signed requests for the timed window of (b) [0 = sized from (a)]")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when (b)/(a) is below the target ({TARGET_RATIO:.0%})")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.threads < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --connections and --threads >= 1")
    if args.duration + args.warmup > 600:
        parser.error("keep --duration + --warmup within 600 s (signatures expire after 900 s)")
    if args.tool == "auto":
        args.tool = "wrk" if common.wrk_binary() else "python"
    elif args.tool == "wrk" and not common.wrk_binary():
        parser.error("wrk is not installed (apt-get install wrk), use --tool python")
    if args.database_url:
        common.require_loopback(args.database_url)
    return args


def pool_size(rate_per_s: float, seconds: float, explicit: int = 0) -> int:
    """Enough pre-signed requests for `seconds` at `rate_per_s`, with headroom."""
    if explicit:
        return explicit
    return max(2000, math.ceil(rate_per_s * seconds * 1.25) + 500)


def bench_bare(args, spec: common.LoadSpec, workdir: Path) -> common.LoadResult:
    server = common.hello_server(workdir).start()
    try:
        return common.run_load(args.tool, "(a) bare Starlette hello", server.base_url, spec, workdir, path="/")
    finally:
        server.stop()


def bench_signed(args, spec: common.LoadSpec, workdir: Path, database_url: str, backend: str,
                 rate_hint: float) -> common.LoadResult:
    server = common.otaplane_server(workdir, database_url, "--rate-limit", "0").start()
    try:
        key = common.admin_credentials(workdir)
        status, body = common.call(server.base_url, key, "CreateProduct",
                                   {"ProductName": PRODUCT_NAME, "NodeType": "0"}, method="POST")
        if status != 200 or not body.get("Success"):
            raise RuntimeError(f"CreateProduct failed: HTTP {status} {body}")
        query = {"ProductKey": body["ProductKey"]}
        status, body = common.call(server.base_url, key, "QueryProduct", query)
        if status != 200 or not body.get("Success") or body["Data"]["ProductName"] != PRODUCT_NAME:
            raise RuntimeError(f"QueryProduct check failed: HTTP {status} {body}")

        # (b) cannot outrun (a) on the same stack: size the pool from (a)'s rate.
        warmup_n = pool_size(rate_hint, spec.warmup_s) if spec.warmup_s > 0 else 0
        timed_n = pool_size(rate_hint, spec.duration_s, args.pool)
        started = time.perf_counter()
        warmup_paths = common.presign_paths(key, "QueryProduct", query, warmup_n)
        paths = common.presign_paths(key, "QueryProduct", query, timed_n)
        print(f"  pre-signed {warmup_n + timed_n} QueryProduct requests in "
              f"{time.perf_counter() - started:.1f} s ({common.RPC_SIGNER_NAME})", file=sys.stderr)
        return common.run_load(args.tool, f"(b) signed QueryProduct ({backend})", server.base_url, spec,
                               workdir, warmup_paths=warmup_paths, paths=paths)
    finally:
        server.stop()
        # A failed request, if any, says why in the server's log.
        log = server.logs(tail=5)
        if any(word in log for word in ("ERROR", "Traceback")):
            print(f"  last lines of the server log:\n{log}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = common.LoadSpec(args.connections, args.duration, args.warmup, args.threads)
    backend = "postgresql" if args.database_url else "sqlite"

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otaplane-bench-")))
        if args.database_url:
            postgres = common.ThrowawayPostgres(args.database_url)
            database_url = stack.enter_context(postgres)
            db_line = f"PostgreSQL {postgres.server_version} (throwaway database {postgres.name})"
        else:
            database_url = ""
            db_line = f"SQLite {sqlite3.sqlite_version} (embedded, WAL)"

        print("  running (a) bare Starlette hello ...", file=sys.stderr)
        bare = bench_bare(args, spec, workdir)
        print(f"  running (b) signed QueryProduct on {backend} ...", file=sys.stderr)
        signed = bench_signed(args, spec, workdir, database_url, backend, bare.rps)

    ratio = signed.rps / bare.rps if bare.rps else 0.0
    extra = [("otaplane", f"{common._version('otaplane')}, database {db_line}, rate limit off"),
             ("sqlalchemy", common._version("sqlalchemy")), ("signer", common.RPC_SIGNER_NAME)]
    print()
    common.print_environment("otaplane gateway benchmark", common.environment(args.tool, spec, extra))
    rows = []
    for result in (bare, signed):
        errors = str(result.errors) + (" (pool ran out: raise --pool)" if result.exhausted else "")
        rows.append([result.label, f"{result.requests}", f"{result.rps:,.0f}", f"{result.p50_ms:.2f}",
                     f"{result.p99_ms:.2f}", errors])
    rows.append(["(b)/(a)", "", f"{ratio:.1%}", "", "", ""])
    common.print_table(["target", "requests", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"\ntarget: signed QueryProduct >= {TARGET_RATIO:.0%} of the bare endpoint's req/s: {verdict}")

    if args.json:
        args.json.write_text(json.dumps({
            "environment": dict(common.environment(args.tool, spec, extra)),
            "results": [
                {"target": r.label, "requests": r.requests, "duration_s": r.duration_s, "rps": r.rps,
                 "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "pool_exhausted": r.exhausted}
                for r in (bare, signed)
            ],
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
        }, indent=2) + "\n")
    if signed.errors or bare.errors or signed.exhausted:
        print("warning: some requests failed; the numbers above are not trustworthy", file=sys.stderr)
        return 2
    return 1 if args.check and ratio < TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
