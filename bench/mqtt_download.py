"""DownloadProtocol MQTT against HTTPS: how fast a package reaches devices, block by block over
MQTT or in one HTTP GET (the device channel issue's MQTT download, which had no figure).

One `otaplane serve` (SQLite unless --database-url, `--rate-limit 0`) and `otaplane sim --devices
N` in its own process: 5,120-byte blocks on `thing/file/download`, one at a time per device, as
link-sdk-c 4.x reads them, or an HTTP GET of the presigned URL; the MD5 is checked either way,
and progress 0 and 100 are reported. For each round, two static ALL jobs of a fresh package of
--size-mb MB (unpaced): one with DownloadProtocol HTTPS (the baseline), one with MQTT. Per job:
the time from its creation to its last SUCCEEDED task (the task history), devices x size / that
time in MB/s, and the server's CPU per MB delivered.

    python bench/mqtt_download.py                       # 1 and 10 devices, 16 MB, 2 rounds (~2 minutes)
    python bench/mqtt_download.py --devices 1 100 --size-mb 4

Bounded: every wait has a deadline, child processes are killed in `finally`. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

import _common as common
from rollout import Api, cpu_seconds, job_status, read_stats, wait_for

MB = 1_000_000
PROTOCOLS = ("HTTPS", "MQTT")


@dataclass
class JobRun:
    protocol: str
    devices: int
    round: int
    seconds: float  # job created -> last SUCCEEDED
    size: int
    server_cpu_s: float

    @property
    def mb_per_s(self) -> float:
        return self.devices * self.size / MB / self.seconds

    @property
    def cpu_ms_per_mb(self) -> float:
        return self.server_cpu_s * 1000 / (self.devices * self.size / MB)


def job_seconds(engine, job_id: str) -> float:
    with engine.connect() as conn:
        created = conn.execute(sa.text("SELECT created_ms FROM ota_jobs WHERE job_id = :j"), {"j": job_id}).scalar()
        last = conn.execute(sa.text(
            "SELECT max(e.at_ms) FROM ota_task_events e JOIN ota_tasks t ON t.id = e.task_pk "
            "JOIN ota_jobs j ON j.id = t.job_pk WHERE j.job_id = :j AND e.to_status = 'SUCCEEDED'"),
            {"j": job_id}).scalar()
    return (last - created) / 1000


def run_fleet(args, devices: int, workdir: Path) -> list[JobRun]:
    """One server and one sim of `devices` devices; per round an HTTPS job, then an MQTT job."""
    from otaplane.settings import Settings

    server = common.otaplane_server(workdir, args.database_url, "--rate-limit", "0")
    sim = None
    runs: list[JobRun] = []
    try:
        server.start()
        api = Api(server.base_url, common.admin_credentials(workdir))
        product_key = api.call("CreateProduct", ProductName=f"bench_mqtt_dl_{devices}", NodeType=0)["ProductKey"]
        stats_path = workdir / "sim-stats.json"
        sim = subprocess.Popen(
            [sys.executable, "-m", "otaplane", "sim", "--devices", str(devices), "--product", product_key,
             "--endpoint", server.base_url, "--data-dir", str(workdir / "data"), "--mqtt-host", "127.0.0.1",
             "--mqtt-port", server.env["OTAPLANE_MQTT_PORT"], "--stats-file", str(stats_path),
             "--step-delay", "0", "--progress-steps", "0,100", "--quiet"],
            stdout=open(workdir / "sim.log", "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: read_stats(stats_path).get("ever_connected") == devices, args.timeout,
                 f"{devices} simulated devices connecting")
        engine = sa.create_engine(Settings(data_dir=workdir / "data", database_url=args.database_url)
                                  .resolved_database_url())
        size = args.size_mb * MB
        version = 1
        for number in range(1, args.rounds + 1):
            for protocol in PROTOCOLS:
                version += 1
                firmware_id = api.package(product_key, f"{version}.0.0", size)
                before = read_stats(stats_path).get("succeeded", 0)
                cpu_before = cpu_seconds(server.process.pid)
                job_id = api.call("CreateOTAStaticUpgradeJob", ProductKey=product_key, FirmwareId=firmware_id,
                                  TargetSelection="ALL", DownloadProtocol=protocol)["Data"]["JobId"]
                wait_for(lambda: read_stats(stats_path).get("succeeded", 0) - before >= devices,
                         args.timeout, f"{devices} devices upgrading over {protocol}", interval=0.1)
                wait_for(lambda: job_status(engine, job_id) == "COMPLETED", args.timeout, "the job completing",
                         interval=0.2)
                run = JobRun(protocol, devices, number, job_seconds(engine, job_id), size,
                             cpu_seconds(server.process.pid) - cpu_before)
                runs.append(run)
                print(f"  {devices} device(s), round {number}, {protocol}: {run.seconds:.2f} s, "
                      f"{run.mb_per_s:,.2f} MB/s", file=sys.stderr, flush=True)
                failed = read_stats(stats_path).get("failed", 0)
                if failed:
                    raise RuntimeError(f"{failed} simulated upgrades failed (see {workdir / 'sim.log'})")
        engine.dispose()
        return runs
    finally:
        if sim is not None:
            sim.kill()
            sim.wait(timeout=30)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 10], help="fleet sizes [1 10]")
    parser.add_argument("--size-mb", type=int, default=16, help="package size in MB, at most 16 [16]")
    parser.add_argument("--rounds", type=int, default=2, help="HTTPS and MQTT jobs per fleet size [2]")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each wait [600]")
    parser.add_argument("--database-url", default="", help="PostgreSQL on loopback instead of SQLite")
    args = parser.parse_args(argv)
    if not 1 <= args.size_mb <= 16:
        parser.error("--size-mb must be 1..16 (DownloadProtocol MQTT takes packages up to 16 MB)")
    if args.database_url:
        common.require_loopback(args.database_url)
    started = time.monotonic()
    runs: list[JobRun] = []
    for devices in args.devices:
        with tempfile.TemporaryDirectory(prefix="otaplane-mqtt-dl-") as tmp:
            if args.database_url:
                with common.ThrowawayPostgres(args.database_url) as url:
                    runs += run_fleet(argparse.Namespace(**{**vars(args), "database_url": url}), devices, Path(tmp))
            else:
                runs += run_fleet(args, devices, Path(tmp))

    common.print_environment("otaplane MQTT download benchmark", [
        ("cpus", common.cpu_model()),
        ("python", sys.version.split()[0]),
        ("database", "PostgreSQL (throwaway database)" if args.database_url else "SQLite (embedded)"),
        ("package", f"{args.size_mb} MB of random bytes, a fresh one per job, MD5 checked by each device"),
        ("mqtt", "otaplane sim: 5,120-byte blocks, one outstanding per device (link-sdk-c 4.x)"),
        ("https", "otaplane sim: one HTTP GET of the presigned URL per device"),
        ("run time", f"{time.monotonic() - started:.0f} s"),
        ("load average", " ".join(f"{v:.2f}" for v in os.getloadavg())),
    ])
    rows = []
    for devices in args.devices:
        medians = {}
        for protocol in PROTOCOLS:
            mine = [r for r in runs if r.devices == devices and r.protocol == protocol]
            medians[protocol] = statistics.median(r.mb_per_s for r in mine)
            rows.append([f"{devices:,}", protocol, ", ".join(f"{r.seconds:.2f}" for r in mine),
                         f"{medians[protocol]:,.2f}", f"{statistics.median(r.cpu_ms_per_mb for r in mine):,.0f}"])
        rows.append([f"{devices:,}", "MQTT / HTTPS", "", f"{medians['MQTT'] / medians['HTTPS']:.1%}", ""])
    print()
    common.print_table(["devices", "protocol", "job: create -> last SUCCEEDED s (per round)",
                        "MB/s (median)", "server CPU ms / MB"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
