"""Firmware figures from issue 3: QueryOTAFirmware throughput and latency by store size, and
presigned download throughput against nginx serving the same file.

In one run, on loopback:
  1. throughput: a signed (V1, HMAC-SHA1, GET) QueryOTAFirmware against a real `otaplane serve`
     (one worker, --rate-limit 0), next to the bare Starlette endpoint (bench/_hello.py) on the
     same stack, at the same fixed concurrency. Target: >= 40% of the bare endpoint's req/s.
  2. latency (p50, p99) of the same request with SMALL (1,000) and LARGE (100,000) packages in
     the store, at one connection and at the load concurrency. Two stores run side by side and
     the rounds alternate between them. Target: p50 grows by less than 20% from SMALL to LARGE.
  Both parts run two workloads: one package queried again and again (what a polling client
  does; every cache stays warm), and a package drawn at random from the whole store for each
  request, signed by its own account's key (at LARGE most requests then miss the caches and
  read their row: the store's size shows).
  3. download throughput of a 200 MB package through its presigned URL (the local blob store,
     `GET /oss/otaplane/...`) against nginx serving the same file from the same directory,
     with curl writing to /dev/null: one download at a time and several in parallel.
     Target: >= 50% of nginx's MB/s.

The packages are real: the schema is migrated by otaplane's own Database class, filler packages
are bulk-inserted with SQLAlchemy Core into its tables (spread over accounts of 500 packages,
the per-instance limit) before the server first starts, and the queried packages are uploaded
and created through the API (GenerateOTAUploadURL, PostObject, CreateOTAFirmware), so that
QueryOTAFirmware does all of its work, presigned URL included.

    python bench/firmware.py                 # SQLite, wrk when installed, about 12-15 minutes
    python bench/firmware.py --quick         # smoke run with small counts, under a minute
    python bench/firmware.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pwd
import random
import re
import shutil
import sqlite3
import statistics
import string
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import _common as common

TARGET_RPS_RATIO = 0.40
TARGET_P50_GROWTH = 0.20
TARGET_DOWNLOAD_RATIO = 0.50
PER_INSTANCE = 500  # otaplane.services.firmware.MAX_PACKAGES_PER_INSTANCE
MB = 1_000_000
SMALL_PACKAGE_BYTES = 64 * 1024
FILLER_SEED = 3  # filler rows are the same from run to run
_ALNUM = string.ascii_letters + string.digits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="QueryOTAFirmware throughput/latency by store size and presigned download throughput.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 and 2,000 packages, 20 MB file, 2 rounds of 1 s (< 60 s in all)")
    parser.add_argument("--only", choices=("queries", "downloads"), help="run one part only")
    parser.add_argument("--packages", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="packages in the two stores [1000 100000; --quick: 100 2000]")
    parser.add_argument("--duration", type=float, help="timed seconds per target and round [5; --quick: 1]")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per target, at least 1 [2; --quick: 1]")
    parser.add_argument("--rounds", type=int,
                        help="timed rounds, alternating the targets; keep it even [6; --quick: 2]")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections under load [32]")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads [1]")
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk, the built-in Python client, or wrk when installed [auto]")
    parser.add_argument("--database-url", default="",
                        help="use PostgreSQL: one throwaway database per store is created on this server "
                             "and dropped afterwards (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    parser.add_argument("--download-mb", type=int, help="size of the downloaded package in MB [200; --quick: 20]")
    parser.add_argument("--downloads", type=int, help="one-at-a-time downloads per target [6; --quick: 2]")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent downloads in a parallel batch [4]")
    parser.add_argument("--batches", type=int, help="parallel batches per target [3; --quick: 1]")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "packages": [100, 2000] if quick else [1000, 100_000],
        "duration": 1.0 if quick else 5.0,
        "warmup": 1.0 if quick else 2.0,
        "rounds": 2 if quick else 6,
        "download_mb": 20 if quick else 200,
        "downloads": 2 if quick else 6,
        "batches": 1 if quick else 3,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    small, large = args.packages
    if not 2 <= small < large:
        parser.error("--packages SMALL LARGE needs 2 <= SMALL < LARGE")
    if args.duration <= 0 or args.warmup < 0 or min(args.threads, args.rounds) < 1 or args.connections < 2:
        parser.error("--duration must be > 0, --warmup >= 0, --threads and --rounds >= 1, --connections >= 2 "
                     "(latency at 1 connection is measured anyway)")
    if args.duration > 600:
        parser.error("keep --duration within 600 s (the signatures of a pool expire after 900 s)")
    if min(args.download_mb, args.downloads, args.parallel, args.batches) < 1:
        parser.error("--download-mb, --downloads, --parallel and --batches must be >= 1")
    if args.tool == "auto":
        args.tool = "wrk" if common.wrk_binary() else "python"
    elif args.tool == "wrk" and not common.wrk_binary():
        parser.error("wrk is not installed (apt-get install wrk), use --tool python")
    if args.database_url:
        common.require_loopback(args.database_url)
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pool_size(rate_per_s: float, seconds: float, headroom: float) -> int:
    """Pre-signed requests for `seconds` at `rate_per_s`, times `headroom`."""
    return max(2000, math.ceil(rate_per_s * seconds * headroom))


# --- filling a store ---------------------------------------------------------------------------
def bulk_fill(sa_url: str, master_key: str, data_dir: Path, count: int) -> tuple[int, float]:
    """Migrate the schema with otaplane's Database, then insert `count` packages with SQLAlchemy
    Core into its tables: accounts of one default instance, one product (with its `default`
    module) and up to PER_INSTANCE packages each, plus the ota_uploads row of each package's
    (never written) object. Returns (instances, seconds)."""
    import sqlalchemy as sa

    from otaplane.secretbox import SecretBox
    from otaplane.store import Database
    from otaplane.store.schema import accounts, firmware, instances, ota_modules, ota_uploads, products
    from otaplane.timefmt import now_ms

    started = time.perf_counter()
    rng = random.Random(FILLER_SEED)

    def alnum(length: int) -> str:
        return "".join(rng.choices(_ALNUM, k=length))

    def hexa(length: int) -> str:
        return f"{rng.getrandbits(4 * length):0{length}x}"

    db = Database(sa_url)
    try:
        db.upgrade()
        if count <= 0:
            return 0, time.perf_counter() - started
        # The server reads the same key file (or OTAPLANE_MASTER_KEY): filler rows decrypt like real ones.
        secret = SecretBox.from_settings(master_key, data_dir).encrypt(alnum(16))
        n_instances = math.ceil(count / PER_INSTANCE)
        base_ms = now_ms() - 86_400_000
        instance_ids = [f"iot-{i:08x}" for i in rng.sample(range(1 << 32), n_instances)]
        with db.begin() as conn:
            def insert(table, rows):
                stmt = sa.insert(table).returning(table.c.id, sort_by_parameter_order=True)
                return conn.execute(stmt, rows).scalars().all()

            account_pks = insert(accounts, [{"name": f"bench-filler-{i:05d}", "created_ms": base_ms}
                                            for i in range(n_instances)])
            instance_pks = insert(instances, [
                {"instance_id": iid, "account_id": a, "is_default": True, "created_ms": base_ms}
                for iid, a in zip(instance_ids, account_pks)])
            product_pks = insert(products, [
                {"instance_pk": pk, "product_key": "a1" + alnum(9), "product_name": "bench_filler",
                 "product_secret_encrypted": secret, "node_type": 0, "aliyun_commodity_code": "iothub",
                 "auth_type": "secret", "id2": False, "status": "DEVELOPMENT_STATUS",
                 "created_ms": base_ms, "modified_ms": base_ms}
                for pk in instance_pks])
            module_pks = insert(ota_modules, [
                {"product_id": pk, "module_name": "default", "name_folded": "default", "is_default": True,
                 "created_ms": base_ms, "modified_ms": base_ms}
                for pk in product_pks])
            batch = 10_000
            for start in range(0, count, batch):
                packages, uploads = [], []
                for i in range(start, min(count, start + batch)):
                    slot, number = divmod(i, PER_INSTANCE)
                    created = base_ms + i
                    key = f"ota/{instance_ids[slot]}/{hexa(24)}.bin"
                    sign = hexa(32)
                    uploads.append({"blob_key": key, "instance_pk": instance_pks[slot], "created_ms": created})
                    packages.append({
                        "firmware_id": alnum(26), "instance_pk": instance_pks[slot],
                        "product_id": product_pks[slot], "module_id": module_pks[slot],
                        "name": f"fw-{number:04d}", "description": None,
                        "dest_version": f"1.{number // 100}.{number % 100}",
                        "src_version": None, "type": 0, "sign_method": "Md5", "sign": sign, "md5": sign,
                        "size": rng.randrange(100_000, 50_000_000), "blob_key": key, "udi": None,
                        "need_to_verify": True, "status": 0, "verify_progress": 0,
                        "created_ms": created, "modified_ms": created,
                    })
                conn.execute(sa.insert(ota_uploads), uploads)
                conn.execute(sa.insert(firmware), packages)
        if not db.is_sqlite:
            # Autovacuum would analyse the new rows within a minute or so, possibly mid-measurement:
            # do it now so that every phase runs on the same statistics. (SQLite: otaplane never
            # runs ANALYZE, so neither do we.)
            with db.begin() as conn:
                conn.execute(sa.text("ANALYZE"))
        return n_instances, time.perf_counter() - started
    finally:
        db.dispose()


def filler_targets(sa_url: str, master_key: str, data_dir: Path) -> list[tuple[tuple[str, str], str]]:
    """An AccessKey for every filler account (made by otaplane's own AccountService), and
    (key, FirmwareId) for every filler package: what a client of each account may query."""
    import sqlalchemy as sa

    from otaplane.secretbox import SecretBox
    from otaplane.services.accounts import AccountService
    from otaplane.store import Database
    from otaplane.store.schema import accounts, firmware, instances

    db = Database(sa_url)
    try:
        service = AccountService(db, SecretBox.from_settings(master_key, data_dir))
        with db.connect() as conn:
            rows = conn.execute(
                sa.select(accounts.c.name, firmware.c.firmware_id)
                .join(instances, instances.c.account_id == accounts.c.id)
                .join(firmware, firmware.c.instance_pk == instances.c.id)
                .where(accounts.c.name.startswith("bench-filler-"))
            ).all()
        keys: dict[str, tuple[str, str]] = {}
        for name in sorted({name for name, _ in rows}):
            new_key = service.create_key(name, "bench/firmware.py")
            keys[name] = (new_key.access_key_id, new_key.access_key_secret)
        return [(keys[name], firmware_id) for name, firmware_id in rows]
    finally:
        db.dispose()


def store_census(sa_url: str) -> tuple[int, int, int]:
    """(packages, instances holding packages, most packages in one instance)."""
    import sqlalchemy as sa

    from otaplane.store import Database
    from otaplane.store.schema import firmware

    db = Database(sa_url)
    try:
        with db.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(firmware)).scalar_one()
            per_instance = (sa.select(sa.func.count().label("n")).select_from(firmware)
                            .group_by(firmware.c.instance_pk).subquery())
            row = conn.execute(sa.select(sa.func.count(), sa.func.max(per_instance.c.n))).one()
        return total, row[0], row[1] or 0
    finally:
        db.dispose()


# --- real packages through the API -------------------------------------------------------------
def _ok(status: int, body: dict, what: str) -> dict:
    if status != 200 or not body.get("Success"):
        raise RuntimeError(f"{what} failed: HTTP {status} {body}")
    return body


def create_package(base_url: str, key: tuple[str, str], product_key: str, path: Path, name: str) -> dict:
    """Upload `path` the way a client does and create a package of it; its QueryOTAFirmware info."""
    import httpx

    data = _ok(*common.call(base_url, key, "GenerateOTAUploadURL", {"FileSuffix": "bin"}, method="POST"),
               "GenerateOTAUploadURL")["Data"]
    common.require_loopback(data["Host"])
    fields = data.get("FormFields") or {
        "key": data["Key"], "policy": data["Policy"], "OSSAccessKeyId": data["OSSAccessKeyId"],
        "Signature": data["Signature"], "success_action_status": "200",
    }
    with path.open("rb") as handle, httpx.Client(trust_env=False, timeout=300) as client:
        response = client.post(data["Host"], data=fields,
                               files={"file": (path.name, handle, "application/octet-stream")})
    if response.status_code not in (200, 201, 204):
        raise RuntimeError(f"upload failed: HTTP {response.status_code} {response.text[:500]}")
    created = _ok(*common.call(base_url, key, "CreateOTAFirmware", {
        "ProductKey": product_key, "FirmwareName": name, "DestVersion": "2.0.0", "FirmwareUrl": data["FirmwareUrl"],
    }, method="POST"), "CreateOTAFirmware")
    firmware_id = created["Data"]["FirmwareId"]
    info = _ok(*common.call(base_url, key, "QueryOTAFirmware", {"FirmwareId": firmware_id}),
               "QueryOTAFirmware")["FirmwareInfo"]
    if not info.get("FirmwareUrl") or info["FirmwareSize"] != path.stat().st_size:
        raise RuntimeError(f"QueryOTAFirmware answered an unexpected package: {info}")
    common.require_loopback(info["FirmwareUrl"])
    return info


def write_random_file(path: Path, size: int) -> str:
    """`size` random bytes; returns their MD5."""
    md5 = hashlib.md5()
    rng = random.Random(size)
    with path.open("wb") as handle:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 8 << 20))
            md5.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return md5.hexdigest()


class PackageStore:
    """A real `otaplane serve` whose store holds `total` packages, `len(files)` of them real."""

    def __init__(self, workdir: Path, database_url: str, total: int, files: list[tuple[str, Path]]):
        from otaplane.settings import Settings

        self.total = total
        self.files = files
        self.workdir = workdir
        self.server = common.otaplane_server(workdir, database_url, "--rate-limit", "0")
        settings = Settings(data_dir=workdir / "data", database_url=database_url)
        self.sa_url = settings.resolved_database_url()
        self.master_key = settings.master_key
        self.label = f"{total:,} packages"
        self.packages: dict[str, dict] = {}

    def start(self) -> "PackageStore":
        fillers = self.total - len(self.files)
        log(f"  {self.label}: bulk-inserting {fillers:,} packages ...")
        self.filler_instances, self.fill_s = bulk_fill(self.sa_url, self.master_key, self.workdir / "data", fillers)
        self.server.start()
        base_url = self.server.base_url
        self.key = common.admin_credentials(self.workdir)
        # After the first start: with a key in the store already, the server would make no admin key.
        self.targets = filler_targets(self.sa_url, self.master_key, self.workdir / "data")
        product = _ok(*common.call(base_url, self.key, "CreateProduct",
                                   {"ProductName": "bench_firmware", "NodeType": "0"}, method="POST"),
                      "CreateProduct")
        for name, path in self.files:
            started = time.perf_counter()
            self.packages[name] = create_package(base_url, self.key, product["ProductKey"], path, name)
            log(f"    {name}: uploaded and created ({path.stat().st_size / MB:,.1f} MB) in "
                f"{time.perf_counter() - started:.1f} s")
        self.census = store_census(self.sa_url)
        if self.census[0] != self.total:
            raise RuntimeError(f"the store holds {self.census[0]} packages, not {self.total}")
        return self

    def presign(self, package: str, count: int) -> list[str]:
        query = {"FirmwareId": self.packages[package]["FirmwareId"]}
        return common.presign_paths(self.key, "QueryOTAFirmware", query, count)

    def presign_spread(self, count: int, rng: random.Random) -> list[str]:
        """`count` requests, each for a package drawn at random from every filler package of
        the store, signed by its account's key: few repeats, so most miss every cache."""
        timestamp = common.utc_timestamp()
        return ["/?" + urlencode(common.signed_params(key, "QueryOTAFirmware", {"FirmwareId": firmware_id},
                                                     "GET", timestamp))
                for key, firmware_id in rng.choices(self.targets, k=count)]

    def stop(self) -> None:
        self.server.stop()
        lines = self.server.logs(tail=400).splitlines()
        first = next((i for i, line in enumerate(lines) if " ERROR " in line or "Traceback" in line), None)
        if first is not None:  # a failed request says why there
            shown = "\n".join(lines[first:first + 60])
            log(f"  the otaplane log ({self.label}) from its first error:\n{shown}")


# --- part 1 and 2: QueryOTAFirmware --------------------------------------------------------------
# What the queries ask for: the same package every time (every cache warm: the cost of the
# request itself), or a package drawn at random from the whole store for each request (the
# store's size shows: at LARGE most requests miss the caches and read the package's row).
WORKLOADS = ("one package", "random package")


@dataclass
class QueryRun:
    store: int  # index into the stores; -1 for the bare endpoint
    connections: int
    round: int
    result: common.LoadResult
    slice: int = 0  # 1-connection windows are cut into alternating slices
    workload: int = 0  # index into WORKLOADS (the bare endpoint: 0)
    baseline: common.LoadResult | None = None  # the bare endpoint's window right next to this one


def run_queries(args, workdir: Path, stores: list[PackageStore]) -> list[QueryRun]:
    """Per round and workload: both stores under load, each window right next to a window of
    the bare endpoint (bare first in odd rounds, last in even ones; the store order alternates
    too), then both stores at one connection in alternating slices of about 1 s. A shared VM's
    speed drifts by tens of percent within a minute: each ratio compares windows seconds apart."""
    tool = args.tool
    loaded = common.LoadSpec(args.connections, args.duration, args.warmup, args.threads)
    single = common.LoadSpec(1, args.duration, args.warmup, 1)
    slices = max(1, int(args.duration))
    slice_s = args.duration / slices
    rng = random.Random(7)
    hello = common.hello_server(workdir)
    runs: list[QueryRun] = []

    def pool(workload: int, store: PackageStore, count: int) -> list[str]:
        return store.presign("small", count) if workload == 0 else store.presign_spread(count, rng)

    try:
        hello.start()
        warmup_s = max(1.0, args.warmup)
        bare_label = "(a) bare Starlette hello"
        labels = {(w, i): f"({'bcde'[2 * w + i]}) QueryOTAFirmware, {WORKLOADS[w]}, {s.label}"
                  for w in range(len(WORKLOADS)) for i, s in enumerate(stores)}
        log(f"  warm-up {warmup_s:g} s each ...")
        bare_rate = common.run_phase(tool, bare_label, hello.base_url, loaded, warmup_s, workdir).rps
        rates = {}
        for (workload, index), label in labels.items():
            store = stores[index]
            paths = pool(workload, store, pool_size(bare_rate, warmup_s, 1.25))
            rates[workload, index] = common.run_phase(tool, label, store.server.base_url, loaded, warmup_s,
                                                      workdir, paths=paths).rps
        single_rates = dict(rates)
        for number in range(1, args.rounds + 1):
            log(f"  round {number}/{args.rounds}: {args.duration:g} s per target and concurrency ...")
            order = list(range(len(stores)))
            if number % 2 == 0:
                order.reverse()  # the window right after the bare one tends to be slower: alternate
            for workload in range(len(WORKLOADS)):
                for index in order:
                    key = (workload, index)
                    paths = pool(workload, stores[index],
                                 pool_size(min(bare_rate, rates[key] * 2), args.duration, 1.25))
                    if number % 2:
                        bare = common.run_phase(tool, bare_label, hello.base_url, loaded, args.duration, workdir)
                    result = common.run_phase(tool, labels[key], stores[index].server.base_url, loaded,
                                              args.duration, workdir, paths=paths)
                    if not number % 2:
                        bare = common.run_phase(tool, bare_label, hello.base_url, loaded, args.duration, workdir)
                    bare_rate = max(bare_rate, bare.rps)
                    rates[key] = max(rates[key], result.rps)
                    runs.append(QueryRun(-1, loaded.connections, number, bare))
                    runs.append(QueryRun(index, loaded.connections, number, result, 0, workload, baseline=bare))
                for part in range(slices):
                    for index in (order if part % 2 == 0 else order[::-1]):
                        key = (workload, index)
                        paths = pool(workload, stores[index], pool_size(single_rates[key] * 2, slice_s, 1.25))
                        result = common.run_phase(tool, labels[key], stores[index].server.base_url, single,
                                                  slice_s, workdir, paths=paths)
                        single_rates[key] = max(single_rates[key], result.rps)
                        runs.append(QueryRun(index, 1, number, result, part, workload))
        return runs
    finally:
        hello.stop()


# --- part 3: downloads ---------------------------------------------------------------------------
def nginx_binary() -> str | None:
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")


def nginx_version() -> str:
    binary = nginx_binary()
    if not binary:
        return ""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"nginx/(\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "?"


def nginx_server(workdir: Path, root: Path) -> common.ServerProcess:
    """nginx, one worker, serving `root` (Debian's shipped defaults: sendfile on, tcp_nopush on)."""
    prefix = workdir / "nginx"
    for sub in ("", "temp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    port = common.free_port()
    # Workers of a root master switch to `nobody`, which cannot enter the 0700 temporary directory.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    temp = prefix / "temp"
    (prefix / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {common.LOOPBACK}:{port};
        root {root};
        location = /healthz {{ return 200 "ok\\n"; }}
    }}
}}
""")
    return common.ServerProcess(
        "nginx", [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
        prefix / "stdout.log", port=port,
    )


@dataclass
class Download:
    status: int
    size: int
    ttfb_s: float
    total_s: float


def _curl_argv(url: str, timeout_s: float) -> list[str]:
    return [shutil.which("curl"), "-s", "-o", "/dev/null", "--noproxy", "*", "--max-time", f"{timeout_s:.0f}",
            "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}", url]


def _parse_curl(out: str) -> Download:
    status, size, ttfb, total = out.split()
    return Download(int(status), int(size), float(ttfb), float(total))


def _httpx_download(url: str, timeout_s: float) -> Download:
    import httpx

    started = time.perf_counter()
    ttfb, size = 0.0, 0
    with httpx.Client(trust_env=False, timeout=timeout_s) as client, client.stream("GET", url) as response:
        ttfb = time.perf_counter() - started
        for chunk in response.iter_raw(1 << 20):
            size += len(chunk)
    return Download(response.status_code, size, ttfb, time.perf_counter() - started)


def download_batch(url: str, count: int, timeout_s: float) -> tuple[list[Download], float]:
    """`count` concurrent full downloads of url, bytes discarded: (each one, wall seconds)."""
    common.require_loopback(url)
    started = time.perf_counter()
    if shutil.which("curl"):
        procs = [subprocess.Popen(_curl_argv(url, timeout_s), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True) for _ in range(count)]
        outs = [p.communicate(timeout=timeout_s + 30)[0] for p in procs]
        wall = time.perf_counter() - started
        return [_parse_curl(out) for out in outs], wall
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda _: _httpx_download(url, timeout_s), range(count)))
    return results, time.perf_counter() - started


@dataclass
class DownloadRun:
    target: str
    mode: str  # "sequential" | "parallel"
    round: int
    downloads: list[Download]
    wall_s: float
    size: int

    @property
    def mb_per_s(self) -> float:
        """One download's own rate (sequential) or the batch's aggregate rate (parallel)."""
        if self.mode == "sequential":
            return self.size / self.downloads[0].total_s / MB
        return self.size * len(self.downloads) / self.wall_s / MB

    @property
    def failed(self) -> int:
        return sum(1 for d in self.downloads if d.status != 200 or d.size != self.size)


def run_downloads(args, workdir: Path, store: PackageStore, blob_root: Path) -> tuple[list[DownloadRun], str]:
    info = store.packages["large"]
    size = info["FirmwareSize"]
    otaplane_url = info["FirmwareUrl"]
    relative = otaplane_url.split("?", 1)[0].split("/oss/otaplane/", 1)[1]
    if not (blob_root / relative).is_file():
        raise RuntimeError(f"the package's object is not at {blob_root / relative}")
    timeout_s = max(60.0, size / MB)  # 1 MB/s at the very least
    targets = [("(b) otaplane presigned URL", otaplane_url)]
    nginx = None
    note = ""
    if nginx_binary():
        nginx = nginx_server(workdir, blob_root)
    else:
        note = "nginx is not installed (apt-get install nginx-light): no baseline"
    runs: list[DownloadRun] = []
    try:
        if nginx:
            nginx.start()
            targets.insert(0, (f"(a) nginx {nginx_version()}, same file", f"{nginx.base_url}/{relative}"))
        # Check once, off the clock, that otaplane's URL really serves the package.
        check, _ = download_batch(otaplane_url, 1, timeout_s)
        if check[0].status != 200 or check[0].size != size:
            raise RuntimeError(f"downloading the package failed: {check[0]}")
        for target, url in targets:  # warm-up: one download each (page cache, connections)
            download_batch(url, 1, timeout_s)
        for number in range(1, args.downloads + 1):
            order = targets if number % 2 else targets[::-1]
            for target, url in order:
                downloads, wall = download_batch(url, 1, timeout_s)
                runs.append(DownloadRun(target, "sequential", number, downloads, wall, size))
        log(f"  {args.batches} batch(es) of {args.parallel} parallel downloads per target ...")
        for number in range(1, args.batches + 1):
            order = targets if number % 2 else targets[::-1]
            for target, url in order:
                downloads, wall = download_batch(url, args.parallel, timeout_s)
                runs.append(DownloadRun(target, "parallel", number, downloads, wall, size))
    finally:
        if nginx:
            nginx.stop()
    return runs, note


def verify_download(url: str, size: int, md5: str) -> None:
    """Stream the package once through otaplane's URL and compare its MD5 (off the clock)."""
    import httpx

    digest, got = hashlib.md5(), 0
    with httpx.Client(trust_env=False, timeout=300) as client, client.stream("GET", url) as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status_code}")
        for chunk in response.iter_raw(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    if got != size or digest.hexdigest() != md5:
        raise RuntimeError(f"the downloaded package differs from the uploaded file ({got} bytes, "
                           f"md5 {digest.hexdigest()})")


# --- reporting ---------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _combine(results: list[common.LoadResult]) -> common.LoadResult:
    if len(results) == 1:
        return results[0]
    return common.LoadResult(
        results[0].label, sum(r.requests for r in results), sum(r.duration_s for r in results),
        _median([r.p50_ms for r in results]), _median([r.p99_ms for r in results]),
        sum(r.errors for r in results), any(r.exhausted for r in results),
    )


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1%}"


def _growth(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.1%}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    small, large = args.packages
    want_queries = args.only in (None, "queries")
    want_downloads = args.only in (None, "downloads")
    query_runs: list[QueryRun] = []
    download_runs: list[DownloadRun] = []
    download_note = ""
    stores: list[PackageStore] = []
    started = time.perf_counter()

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otaplane-bench-")))
        files_dir = workdir / "files"
        files_dir.mkdir()
        small_file = files_dir / "small.bin"
        write_random_file(small_file, SMALL_PACKAGE_BYTES)
        large_size = args.download_mb * MB
        large_file = files_dir / "large.bin"
        large_md5 = ""
        if want_downloads:
            log(f"writing a {args.download_mb} MB package ...")
            large_md5 = write_random_file(large_file, large_size)

        sizes = [small, large] if want_queries else [small]
        database_urls = []
        pg_version = ""
        for _ in sizes:
            if args.database_url:
                postgres = common.ThrowawayPostgres(args.database_url)
                database_urls.append(stack.enter_context(postgres))
                pg_version = postgres.server_version
            else:
                database_urls.append("")
        for index, (total, url) in enumerate(zip(sizes, database_urls)):
            files = [("small", small_file)]
            if index == 0 and want_downloads:
                files.append(("large", large_file))
            store = PackageStore(workdir / f"store-{total}", url, total, files)
            stack.callback(store.stop)
            stores.append(store.start())
        if want_downloads:
            large_file.unlink()  # the blob store has its own copy; keep one in the page cache

        if want_queries:
            log(f"QueryOTAFirmware: {args.rounds} round(s) ...")
            query_runs = run_queries(args, workdir, stores)
        if want_downloads:
            store = stores[0]
            info = store.packages["large"]
            verify_download(info["FirmwareUrl"], large_size, large_md5)
            log(f"downloads: {args.downloads} one at a time per target ...")
            download_runs, download_note = run_downloads(args, workdir, store, store.workdir / "data" / "blobs")
        # Leaving the block stops the servers, then drops the throwaway databases and the files.

    # --- environment
    if args.database_url:
        db_line = f"PostgreSQL {pg_version} (a throwaway database per store, dropped after; ANALYZE after the fill)"
    else:
        db_line = f"SQLite {sqlite3.sqlite_version} (embedded, WAL, a file per store)"
    spec = common.LoadSpec(args.connections, args.duration, args.warmup, args.threads)
    extra = [
        ("otaplane", f"{common._version('otaplane')}, `otaplane serve`, one worker per store, rate limit off, "
                     "local blob store"),
        ("database", db_line),
        ("sqlalchemy", common._version("sqlalchemy")),
    ]
    for store in stores:
        total, instances, most = store.census
        extra.append((f"store {store.label}",
                      f"{total:,} packages in {instances:,} instances (at most {most} each): "
                      f"{total - len(store.files):,} bulk-inserted in {store.fill_s:.1f} s, "
                      f"{len(store.files)} uploaded and created through the API"))
    if want_queries:
        extra += [
            ("signer", f"{common.RPC_SIGNER_NAME} (V1, HMAC-SHA1; a fresh nonce per request, signed before "
                       "each timed window)"),
            ("request", "GET QueryOTAFirmware?FirmwareId=<id> (its answer holds a fresh presigned URL)"),
            ("workloads", f"{WORKLOADS[0]}: a real 64 KiB package uploaded through the API, every request; "
                          f"{WORKLOADS[1]}: for each request a filler package drawn at random from the whole "
                          "store, signed with an AccessKey of its own account"),
            ("latency", f"both stores up; at {args.connections} connections a whole window each, next to a "
                        "window of the bare endpoint, the orders alternating between rounds; at 1 connection "
                        "alternating slices of about 1 s"),
        ]
    if want_downloads:
        client = f"curl {_curl_version()} to /dev/null" if shutil.which("curl") else "httpx stream, bytes discarded"
        extra += [
            ("downloads", f"one {args.download_mb} MB package ({large_size:,} bytes, random, page cache warm); "
                          f"{args.downloads} x 1 at a time and {args.batches} x {args.parallel} in parallel per "
                          "target, alternating; MB = 10^6 bytes"),
            ("download client", client),
            ("nginx", f"{nginx_version() or 'not installed'}: 1 worker, sendfile on, tcp_nopush on, access log off"),
        ]
    extra.append(("run time", f"{time.perf_counter() - started:.0f} s"))
    environment = common.environment(args.tool, spec, extra, args.rounds)
    print()
    common.print_environment("otaplane firmware benchmark", environment)

    summary: list[tuple[str, float, str, bool | None]] = []  # (figure, value, target text, met)
    failures = 0

    # --- queries
    if query_runs:
        # One row per round, workload, store and concurrency; the 1-connection slices of a round
        # are combined (requests summed, p50 and p99 the medians of the slices').
        groups: dict[tuple[int, int, int, int], list[common.LoadResult]] = {}
        for run in query_runs:
            groups.setdefault((run.workload, run.store, run.connections, run.round), []).append(run.result)
            failures += run.result.errors + run.result.exhausted
        combined = {key: _combine(results) for key, results in groups.items()}
        slices = max(1, int(args.duration))  # as in run_queries
        print(f"QueryOTAFirmware, signed, one worker; each round, per workload: both stores at "
              f"{args.connections} connections, each window next to one of the bare endpoint's (its row: "
              f"those windows together), and both at 1 connection in {slices} alternating slices (p50, p99: "
              "medians of the slices')")
        rows = []
        for (_workload, _store, conns, number), r in combined.items():
            errors = str(r.errors) + (" (pool ran out)" if r.exhausted else "")
            rows.append([r.label, str(conns), str(number), f"{r.requests:,}", f"{r.rps:,.0f}",
                         f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", errors])
        common.print_table(["target", "conns", "round", "requests", "req/s", "p50 ms", "p99 ms", "errors"], rows)
        print()

        def per_round(workload: int, store: int, conns: int) -> dict[int, common.LoadResult]:
            return {n: r for (w, s, c, n), r in combined.items() if w == workload and s == store and c == conns}

        print("medians of the rounds")
        rows = []
        for label, workload, store, conns in [
            ("bare Starlette hello", 0, -1, args.connections),
            *[(f"QueryOTAFirmware, {WORKLOADS[w]}, {st.label}", w, i, c)
              for w in range(len(WORKLOADS)) for c in (args.connections, 1) for i, st in enumerate(stores)],
        ]:
            results = list(per_round(workload, store, conns).values())
            rows.append([label, str(conns), f"{_median([r.rps for r in results]):,.0f}",
                         f"{_median([r.p50_ms for r in results]):.2f}",
                         f"{_median([r.p99_ms for r in results]):.2f}"])
        common.print_table(["target", "conns", "req/s", "p50 ms", "p99 ms"], rows)
        print()
        for workload, what in enumerate(WORKLOADS):
            for index, store in enumerate(stores):
                ratio = _median([run.result.rps / run.baseline.rps for run in query_runs
                                 if run.store == index and run.workload == workload and run.baseline is not None
                                 and run.baseline.rps])
                summary.append((f"QueryOTAFirmware req/s vs bare endpoint ({what}, {store.label}, "
                                f"{args.connections} conns)", ratio, f">= {TARGET_RPS_RATIO:.0%}",
                                ratio >= TARGET_RPS_RATIO))
        # p50 growth: the median of the ratios of back-to-back windows (slices at 1 connection).
        for workload, what in enumerate(WORKLOADS):
            for conns in (1, args.connections):
                pairs: dict[tuple[int, int], dict[int, float]] = {}
                for run in query_runs:
                    if run.store >= 0 and run.workload == workload and run.connections == conns:
                        pairs.setdefault((run.round, run.slice), {})[run.store] = run.result.p50_ms
                growth = _median([p[1] / p[0] - 1 for p in pairs.values() if len(p) == 2 and p[0]])
                summary.append((f"p50 growth {stores[0].label} -> {stores[1].label} ({what}, "
                                f"{conns} conn{'s' * (conns > 1)})", growth, f"< +{TARGET_P50_GROWTH:.0%}",
                                growth < TARGET_P50_GROWTH))

    # --- downloads
    if download_runs:
        print(f"downloads of the {args.download_mb} MB package (MB/s: of each download one at a time; "
              f"of the whole batch for {args.parallel} in parallel)")
        rows = []
        by_key: dict[tuple[str, str], list[DownloadRun]] = {}
        for run in download_runs:
            by_key.setdefault((run.target, run.mode), []).append(run)
            failures += run.failed
        for (target, mode), runs in by_key.items():
            rates = [r.mb_per_s for r in runs]
            ttfb = [d.ttfb_s * 1000 for r in runs for d in r.downloads]
            label = "1 at a time" if mode == "sequential" else f"{args.parallel} in parallel"
            rows.append([target, label, str(len(runs)), f"{_median(rates):,.0f}", f"{min(rates):,.0f}",
                         f"{max(rates):,.0f}", f"{_median(ttfb):.1f}", str(sum(r.failed for r in runs))])
        common.print_table(["target", "mode", "runs", "MB/s median", "min", "max", "TTFB ms", "failed"], rows)
        print()
        targets = list(dict.fromkeys(r.target for r in download_runs))
        if len(targets) == 2:
            for mode, label in (("sequential", "1 at a time"), ("parallel", f"{args.parallel} in parallel")):
                base = {r.round: r.mb_per_s for r in download_runs if r.target == targets[0] and r.mode == mode}
                ours = {r.round: r.mb_per_s for r in download_runs if r.target == targets[1] and r.mode == mode}
                ratio = _median([ours[n] / base[n] for n in ours if n in base and base[n]])
                summary.append((f"download MB/s vs nginx ({label})", ratio, f">= {TARGET_DOWNLOAD_RATIO:.0%}",
                                ratio >= TARGET_DOWNLOAD_RATIO))
        if download_note:
            print(f"note: {download_note}\n")

    if summary:
        print("targets (issue 3; medians of per-round ratios; req/s: each window against the bare endpoint's "
              "window next to it)")
        common.print_table(
            ["figure", "value", "target", "verdict"],
            [[name, _growth(value) if "growth" in name else _pct(value), target,
              "met" if met else "NOT met"] for name, value, target, met in summary],
        )

    if args.json:
        args.json.write_text(json.dumps({
            "environment": dict(environment),
            "queries": [{"target": r.result.label, "workload": WORKLOADS[r.workload],
                         "connections": r.connections, "round": r.round, "slice": r.slice,
                         "requests": r.result.requests,
                         "duration_s": r.result.duration_s, "rps": r.result.rps, "p50_ms": r.result.p50_ms,
                         "p99_ms": r.result.p99_ms, "errors": r.result.errors,
                         "pool_exhausted": r.result.exhausted,
                         "baseline_rps": r.baseline.rps if r.baseline else None} for r in query_runs],
            "downloads": [{"target": r.target, "mode": r.mode, "round": r.round, "mb_per_s": r.mb_per_s,
                           "wall_s": r.wall_s, "bytes": r.size,
                           "each": [d.__dict__ for d in r.downloads]} for r in download_runs],
            "targets": [{"figure": n, "value": v, "target": t, "met": m} for n, v, t, m in summary],
        }, indent=2) + "\n")
    if failures:
        print("warning: some requests or downloads failed; the numbers above are not trustworthy", file=sys.stderr)
        return 2
    return 1 if args.check and not all(met for *_, met in summary) else 0


def _curl_version() -> str:
    out = subprocess.run([shutil.which("curl"), "--version"], capture_output=True, text=True, timeout=10)
    match = re.match(r"curl (\S+)", out.stdout)
    return match.group(1) if match else "?"


if __name__ == "__main__":
    sys.exit(main())
