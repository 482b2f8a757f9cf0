"""Rollout figures from issue 5: a static ALL job over N simulated devices (10,000 by default)
with MaximumPerMinute=10,000, on SQLite and (with --database-url) on PostgreSQL.

For each backend, in one run, on loopback:
  1. a fresh `otaplane serve` (one process, --rate-limit 0, its own data dir and MQTT port);
     a product and two packages (2.0.0 and 3.0.0, NeedToVerify=false) through the API;
  2. `otaplane sim --devices N` in its own process: registers the devices through the API,
     connects them over MQTT, reports 1.0.0, and upgrades what it is sent (HTTP download of the
     package, MD5 check, progress 0 and 100, the new version on /ota/device/inform);
  3. baseline: package 2.0.0 pushed to all N devices at once, unpaced, straight into the
     pending-push table from this process (DeviceOtaService.push_many, what `otaplane devices
     push` does): the time until every device reports 2.0.0 is what the devices, the channel
     and the sim can do without any job;
  4. the job: CreateOTAStaticUpgradeJob(ALL, MaximumPerMinute=10000) with package 3.0.0 through
     the API, then until every task is SUCCEEDED:
     - push rate: pushes the devices took, per minute, from the first to the last, against the
       configured rate (target: within 5%). A task records that moment when it leaves QUEUED (the
       task history's timestamps): NOTIFIED when the device's acknowledgement is recorded, or
       IN_PROGRESS when the device's first progress report was recorded before it (both count;
       counting NOTIFIED alone would drop those tasks but keep the time span). The table also
       shows how many went through NOTIFIED;
     - time from job creation to the last SUCCEEDED (at 10,000/min the pace alone takes
       (N-1)/10,000 minutes);
     - dispatcher CPU per 1,000 tasks (the dispatcher's own thread CPU time during the job, from
       the counters on /healthz), and the whole server's CPU per 1,000 tasks (device reports,
       deliveries, downloads) and the simulator's next to it.

    python bench/rollout.py                          # SQLite, 10,000 devices (about 3-4 minutes)
    python bench/rollout.py --devices 1000           # quicker
    python bench/rollout.py --database-url postgresql://postgres@127.0.0.1:5432/test  # SQLite, then PG

Bounded: every wait has a deadline; child processes are killed in `finally`. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ThrowawayPostgres, admin_credentials, otaplane_server, require_loopback, signed_params,
)

from otaplane.settings import Settings  # noqa: E402

RATE = 10_000


@dataclass
class Result:
    backend: str
    devices: int
    connect_s: float = 0.0
    baseline_s: float = 0.0
    notified: int = 0
    taken: int = 0  # tasks whose push the device took (left QUEUED)
    push_rate: float = 0.0
    to_last_success_s: float = 0.0
    pace_floor_s: float = 0.0
    succeeded: int = 0
    dispatcher_cpu_ms_per_1000: float = 0.0
    server_cpu_ms_per_1000: float = 0.0
    sim_cpu_ms_per_1000: float = 0.0
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Api:
    def __init__(self, base_url: str, key: tuple[str, str]):
        self.base_url = base_url
        self.key = key
        self.http = httpx.Client(timeout=60)

    def call(self, action: str, **params) -> dict:
        body = self.http.get(self.base_url + "/", params=signed_params(self.key, action, {
            k: str(v) for k, v in params.items()}, "GET")).json()
        if not body.get("Success"):
            raise RuntimeError(f"{action} failed: {body}")
        return body

    def package(self, product_key: str, version: str, size: int = 4096) -> str:
        """A package of `size` random bytes, uploaded and created through the API."""
        upload = self.call("GenerateOTAUploadURL", FileSuffix="bin")["Data"]
        content = os.urandom(size)
        files = {"key": (None, upload["Key"]), "policy": (None, upload["Policy"]),
                 "OSSAccessKeyId": (None, upload["OSSAccessKeyId"]), "Signature": (None, upload["Signature"]),
                 "success_action_status": (None, "200"), "file": ("fw.bin", content)}
        response = self.http.post(upload["Host"], files=files)
        response.raise_for_status()
        return self.call("CreateOTAFirmware", ProductKey=product_key, FirmwareName="bench_" + version.replace(".", "_"),
                         DestVersion=version, FirmwareUrl=upload["FirmwareUrl"], NeedToVerify="false",
                         )["Data"]["FirmwareId"]


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for(check, timeout_s: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


def run_backend(name: str, database_url: str, args, workdir: Path) -> Result:
    result = Result(name, args.devices)
    server = otaplane_server(workdir, database_url, "--rate-limit", "0")
    sim = None
    try:
        server.start()
        mqtt_port = int(server.env["OTAPLANE_MQTT_PORT"])
        api = Api(server.base_url, admin_credentials(workdir))
        product_key = api.call("CreateProduct", ProductName=f"bench_rollout_{int(time.time())}",
                               NodeType=0)["ProductKey"]
        baseline_fw = api.package(product_key, "2.0.0")
        job_fw = api.package(product_key, "3.0.0")

        stats_path = workdir / "sim-stats.json"
        sim_log = open(workdir / "sim.log", "wb")
        sim = subprocess.Popen(
            [sys.executable, "-m", "otaplane", "sim", "--devices", str(args.devices), "--product", product_key,
             "--endpoint", server.base_url, "--data-dir", str(workdir / "data"), "--mqtt-host", "127.0.0.1",
             "--mqtt-port", str(mqtt_port), "--stats-file", str(stats_path), "--step-delay", "0",
             "--progress-steps", "0,100", "--quiet"],
            stdout=sim_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = time.monotonic()
        wait_for(lambda: read_stats(stats_path).get("ever_connected") == args.devices and
                 read_stats(stats_path).get("first_connect_s") is not None,
                 args.timeout, f"{args.devices} simulated devices connecting")
        result.connect_s = read_stats(stats_path)["first_connect_s"]
        print(f"[{name}] {args.devices} devices connected in {result.connect_s:.1f} s "
              f"(registration included: {time.monotonic() - started:.1f} s)", flush=True)

        settings = Settings(data_dir=workdir / "data", database_url=database_url)
        engine = sa.create_engine(settings.resolved_database_url())
        wait_for(lambda: versions_reported(engine, product_key, "1.0.0") == args.devices, args.timeout,
                 "every device reporting 1.0.0")

        # Baseline: every device gets package 2.0.0 at once, without a job.
        from otaplane.services.container import Services
        services = Services.build(settings)
        try:
            device_ids = [row[0] for row in services.db.engine.connect().execute(sa.text(
                "SELECT d.id FROM devices d JOIN products p ON p.id = d.product_id WHERE p.product_key = :pk"),
                {"pk": product_key})]
            firmware_pk = firmware_row_id(services.db.engine, baseline_fw)
            before = read_stats(stats_path).get("succeeded", 0)
            pushed_at = time.monotonic()
            for start in range(0, len(device_ids), 1000):
                services.device_ota.push_many(firmware_pk, device_ids[start:start + 1000])
            wait_for(lambda: read_stats(stats_path).get("succeeded", 0) - before >= args.devices, args.timeout,
                     "every device upgrading to 2.0.0 (baseline)", interval=0.2)
            result.baseline_s = time.monotonic() - pushed_at
        finally:
            services.close()
        wait_for(lambda: versions_reported(engine, product_key, "2.0.0") == args.devices, args.timeout,
                 "every device recorded on 2.0.0")
        print(f"[{name}] baseline: unpaced push to all, every device on 2.0.0 after {result.baseline_s:.1f} s",
              flush=True)

        # The job.
        spy = start_profile(args, name, server.process.pid)
        sim_spy = start_profile(args, name, sim.pid, "sim")
        cpu_before = cpu_seconds(server.process.pid)
        sim_cpu_before = cpu_seconds(sim.pid)
        dispatcher_before = api.http.get(server.base_url + "/healthz").json()["dispatcher"]
        job_id = api.call("CreateOTAStaticUpgradeJob", ProductKey=product_key, FirmwareId=job_fw,
                          TargetSelection="ALL", MaximumPerMinute=RATE)["Data"]["JobId"]
        wait_for(lambda: job_status(engine, job_id) == "COMPLETED", args.timeout + args.devices / RATE * 60,
                 "the job completing", interval=0.5)
        cpu_after = cpu_seconds(server.process.pid)
        result.sim_cpu_ms_per_1000 = (cpu_seconds(sim.pid) - sim_cpu_before) * 1000 / args.devices * 1000
        dispatcher_after = api.http.get(server.base_url + "/healthz").json()["dispatcher"]
        stop_profile(spy)
        stop_profile(sim_spy)
        result.duplicates = read_stats(stats_path).get("duplicates", 0)
        measure_job(engine, job_id, result)
        dispatched = dispatcher_after["tasks_dispatched"] - dispatcher_before["tasks_dispatched"]
        cpu = dispatcher_after["cpu_seconds"] - dispatcher_before["cpu_seconds"]
        result.dispatcher_cpu_ms_per_1000 = cpu * 1000 / dispatched * 1000 if dispatched else 0.0
        result.server_cpu_ms_per_1000 = (cpu_after - cpu_before) * 1000 / args.devices * 1000
        engine.dispose()
    finally:
        if sim is not None and sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(20)
            except subprocess.TimeoutExpired:
                sim.kill()
        server.stop()
    return result


def start_profile(args, name: str, pid: int, what: str = "server"):
    """--profile DIR: py-spy samples a process during the job (collapsed stacks, for flame graphs)."""
    if not args.profile:
        return None
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    out = Path(args.profile) / f"{what}-{name}.collapsed"
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
                             "--threads", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(spy) -> None:
    if spy is not None and spy.poll() is None:
        import signal
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()


def versions_reported(engine, product_key: str, version: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM device_modules m JOIN devices d ON d.id = m.device_id "
            "JOIN products p ON p.id = d.product_id WHERE p.product_key = :pk AND m.module_name = 'default' "
            "AND m.version = :v"), {"pk": product_key, "v": version}).scalar()


def firmware_row_id(engine, firmware_id: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM firmware WHERE firmware_id = :f"), {"f": firmware_id}).scalar()


def job_status(engine, job_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT status FROM ota_jobs WHERE job_id = :j"), {"j": job_id}).scalar()


def measure_job(engine, job_id: str, result: Result) -> None:
    with engine.connect() as conn:
        created = conn.execute(sa.text("SELECT created_ms FROM ota_jobs WHERE job_id = :j"), {"j": job_id}).scalar()
        times = lambda status: [row[0] for row in conn.execute(sa.text(  # noqa: E731
            "SELECT e.at_ms FROM ota_task_events e JOIN ota_tasks t ON t.id = e.task_pk "
            "JOIN ota_jobs j ON j.id = t.job_pk WHERE j.job_id = :j AND e.to_status = :s ORDER BY e.at_ms"),
            {"j": job_id, "s": status})]
        notified = times("NOTIFIED")
        succeeded = times("SUCCEEDED")
        # When each task's push was taken: its first move out of QUEUED (NOTIFIED, or IN_PROGRESS).
        taken = sorted(row[0] for row in conn.execute(sa.text(
            "SELECT min(e.at_ms) FROM ota_task_events e JOIN ota_tasks t ON t.id = e.task_pk "
            "JOIN ota_jobs j ON j.id = t.job_pk WHERE j.job_id = :j AND e.from_status = 'QUEUED' "
            "GROUP BY e.task_pk"), {"j": job_id}))
    result.notified = len(notified)
    result.taken = len(taken)
    if len(taken) > 1:
        result.push_rate = (len(taken) - 1) * 60_000 / max(1, taken[-1] - taken[0])
    result.succeeded = len(succeeded)
    if succeeded:
        result.to_last_success_s = (succeeded[-1] - created) / 1000
    result.pace_floor_s = (result.devices - 1) / RATE * 60


def print_table(results: list[Result]) -> None:
    header = ["backend", "devices", "connect s", "baseline: unpaced push, all on new version s", "pushes taken",
              "of them via NOTIFIED", f"push rate /min (configured {RATE:,})", "vs configured", "job: create -> last SUCCEEDED s",
              "pace alone s", "dispatcher CPU ms / 1000 tasks", "server CPU ms / 1000 tasks", "sim CPU ms / 1000 tasks",
              "duplicate pushes"]
    rows = []
    for r in results:
        deviation = (r.push_rate - RATE) / RATE * 100 if r.push_rate else float("nan")
        rows.append([r.backend, f"{r.devices:,}", f"{r.connect_s:.1f}", f"{r.baseline_s:.1f}", f"{r.taken:,}",
                     f"{r.notified:,}", f"{r.push_rate:,.0f}", f"{deviation:+.1f}%", f"{r.to_last_success_s:.1f}",
                     f"{r.pace_floor_s:.1f}", f"{r.dispatcher_cpu_ms_per_1000:.0f}",
                     f"{r.server_cpu_ms_per_1000:.0f}", f"{r.sim_cpu_ms_per_1000:.0f}", str(r.duplicates)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    for r in results:
        within = r.push_rate and abs(r.push_rate - RATE) / RATE <= 0.05
        print(f"{r.backend}: push rate within 5% of {RATE:,}/min: {'MET' if within else 'NOT MET'}; "
              f"{r.succeeded:,}/{r.devices:,} SUCCEEDED" + (f"; notes: {'; '.join(r.notes)}" if r.notes else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--database-url", default="", help="also run on this PostgreSQL server (loopback)")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for each wait")
    parser.add_argument("--profile", default="", help="directory for py-spy samples of the server and the sim "
                                                      "during the job")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    results = []
    backends = [] if args.skip_sqlite else [("sqlite", "")]
    if args.database_url:
        require_loopback(args.database_url)
        backends.append(("postgresql", args.database_url))
    for name, url in backends:
        workdir = Path(tempfile.mkdtemp(prefix=f"otaplane-rollout-{name}-"))
        print(f"[{name}] work directory {workdir}", flush=True)
        if url:
            with ThrowawayPostgres(url) as database_url:
                results.append(run_backend(name, database_url, args, workdir))
        else:
            results.append(run_backend(name, "", args, workdir))
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
