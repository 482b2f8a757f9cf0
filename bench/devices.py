"""The device channel at scale (issue 4): N simulated devices on one `otaplane serve` process.

For each N (1,000 and 10,000 by default) it starts a fresh `otaplane serve` (one worker, SQLite,
`--rate-limit 0`, a free MQTT port), registers N devices and creates one package directly
through the services against the server's database (same data dir: `batch_register`,
`apply_page` for the secrets, a local blob + `firmware.create`), then

- connects the N devices from a separate load process (raw asyncio MQTT 3.1.1: CONNECT with the
  Aliyun HMAC-SHA1 signature, PUBACK; no SUBSCRIBE, the channel subscribes devices itself),
  at most --window CONNECTs outstanding: connects/s over the whole ramp, and the server's RSS
  (VmRSS of the process and its children) after minus before, per device;
- burst: `DeviceOtaService.push_many` of the package to all N in one call from this process;
  the server finds the rows with its poll (every PENDING_POLL_INTERVAL_S) and delivers them:
  time until every device has its push, latency trigger -> receipt p50/p99 (one clock: CLOCK_MONOTONIC);
- paced: --paced-rate pushes per minute (10,000 = the platform's maximum) for --paced-seconds,
  one `push_many` of rate/60 devices each second: latency p50/p99 of each push.

The same N again with the pusher in the channel's process ("in-process push": DeviceChannel
started as `serve` starts it, minus HTTP, and push_many in a worker thread of that process, so
the push listener wakes the channel at once: the path of an upgrade-job worker in the server);
`--no-inprocess` skips it. Experiments: `--undelivered-batch N` (page size of the undelivered
sweep in that variant), `--tracemalloc` (where the connections' Python memory goes), `--profile DIR` (py-spy).

The baseline, in the same run: stock amqtt (`amqtt.broker.Broker`, default plugins, anonymous)
in its own process; the devices SUBSCRIBE to their upgrade topic after CONNACK (stock amqtt has
no server-side subscriptions), and pushes are `Broker.internal_message_broadcast` (amqtt's
broadcast: each message matched against every subscription). Only at --stock-sizes (1,000 by
default): at 10,000 it takes minutes (the issue: a 10,000 burst took 32 s).

Bounded: every wait has a deadline, child processes are killed in `finally`. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from otaplane.sim import mqtt  # noqa: E402

LOOPBACK = common.LOOPBACK
PRODUCT_NAME = "bench-devices"
KEEPALIVE = 900  # no PINGREQ during a run
TARGET_DEVICES = 10_000
TARGET_PACED_PER_MIN = 10_000
TARGET_P99_S = 1.0
TARGET_BURST_S = 10.0


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int) -> int:
    """VmRSS of pid and its descendants, in KiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def pct(values: list[float], p: float) -> float:
    return common._percentile(sorted(values), p)  # noqa: SLF001


# --- the load process: N raw MQTT 3.1.1 devices in one asyncio loop ---------------------------
def connect_packet(pk: str, dn: str, secret: str) -> bytes:
    return mqtt.connect_packet(*mqtt.aliyun_login(pk, dn, secret), KEEPALIVE)


def anonymous_connect_packet(client_id: str) -> bytes:
    return mqtt.connect_packet(client_id, None, None, KEEPALIVE)


async def load_worker(devices_file: str, port: int, mode: str, window: int) -> None:
    """stdin commands -> one JSON line each on stdout: connect | count | dump | quit."""
    loop = asyncio.get_running_loop()
    devices = json.loads(Path(devices_file).read_text())  # [[pk, dn, secret], ...]
    receipts: list[tuple[int, int, float]] = []  # (device index, message id, monotonic)
    clock = time.monotonic

    class Device(asyncio.Protocol):
        def __init__(self, index: int):
            self.index = index
            self.buffer = bytearray()
            self.ready = loop.create_future()

        def connection_made(self, transport):
            self.transport = transport
            pk, dn, secret = devices[self.index]
            if mode == "stock":
                transport.write(anonymous_connect_packet(f"dev{self.index}"))
            else:
                transport.write(connect_packet(pk, dn, secret))

        def data_received(self, data):
            self.buffer += data
            buf = self.buffer
            while len(buf) >= 2:
                length, shift, i = 0, 0, 1
                while True:
                    if i >= len(buf):
                        return
                    byte = buf[i]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not byte & 0x80:
                        break
                if len(buf) < i + length:
                    return
                header = buf[0]
                kind, body = header & 0xF0, bytes(buf[i:i + length])
                del buf[:i + length]
                if kind == 0x20:  # CONNACK
                    if body[1] != 0:
                        self._done(f"CONNACK {body[1]}")
                    elif mode == "stock":
                        self.transport.write(mqtt.subscribe_packet(f"/ota/device/upgrade/{devices[0][0]}/dev{self.index}"))
                    else:
                        self._done(None)
                elif kind == 0x90:  # SUBACK
                    self._done(None if body[2] in (0, 1) else f"SUBACK {body[2]}")
                elif kind == 0x30:  # PUBLISH
                    now = clock()
                    topic_len = int.from_bytes(body[:2], "big")
                    offset = 2 + topic_len
                    if (header >> 1) & 3:
                        pid = body[offset:offset + 2]
                        offset += 2
                        self.transport.write(b"\x40\x02" + pid)
                    with contextlib.suppress(ValueError):
                        receipts.append((self.index, int(json.loads(body[offset:])["id"]), now))

        def _done(self, problem):
            if not self.ready.done():
                self.ready.set_result(problem)

        def connection_lost(self, exc):
            self._done("connection lost")

    protocols: list[Device] = []

    async def connect_all() -> dict:
        gate = asyncio.Semaphore(window)
        failures: list[str] = []
        failed_indexes: list[int] = []

        async def one(index: int):
            async with gate:
                try:
                    _, protocol = await loop.create_connection(lambda: Device(index), LOOPBACK, port)
                    problem = await asyncio.wait_for(protocol.ready, 60)
                except (OSError, asyncio.TimeoutError) as exc:
                    problem = repr(exc)
                    protocol = None
                if problem:
                    failures.append(problem)
                    failed_indexes.append(index)
                elif protocol is not None:
                    protocols.append(protocol)

        started = clock()
        await asyncio.gather(*(one(i) for i in range(len(devices))))
        elapsed = clock() - started
        return {"connected": len(protocols), "failed": len(failures), "elapsed": elapsed,
                "failures": sorted(set(failures))[:5], "failed_indexes": failed_indexes}

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "connect":
            reply(await connect_all())
        elif line == "count":
            reply({"count": len(receipts)})
        elif line == "dump":
            reply({"receipts": receipts})
            receipts.clear()
    for protocol in protocols:
        protocol.transport.close()


class LoadProcess:
    def __init__(self, devices: list[list[str]], port: int, mode: str, window: int, workdir: Path):
        path = workdir / f"devices-{mode}-{len(devices)}.json"
        path.write_text(json.dumps(devices))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--_load", str(path), "--_port", str(port), "--_mode", mode,
             "--window", str(window)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ask(None, timeout=30)

    def ask(self, command: str | None, timeout: float = 120) -> dict:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"load process: no answer to {command!r} in {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("load process exited")
        return json.loads(line)

    def wait_for(self, expected: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ask("count")["count"] >= expected:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(15)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# --- the baseline: stock amqtt in its own process -----------------------------------------------
async def stock_broker(port: int) -> None:
    """stdin: `push <first> <count> <tag>` broadcasts to devices first..first+count-1 (returns the
    trigger time), `quit`."""
    from amqtt.broker import Broker

    for name in ("amqtt", "transitions"):
        import logging

        logging.getLogger(name).setLevel(logging.WARNING)
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{port}", "max_connections": 0}},
                     "timeout_disconnect_delay": 0})
    await broker.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    tasks = set()
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "push":
            first, count, tag, pk = int(line[1]), int(line[2]), int(line[3]), line[4]
            started = time.monotonic()
            for i in range(first, first + count):
                task = asyncio.ensure_future(broker.internal_message_broadcast(
                    f"/ota/device/upgrade/{pk}/dev{i}", json.dumps({"id": tag}).encode(), 1))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            print(json.dumps({"t0": started}), flush=True)
    await broker.shutdown()


# --- otaplane's DeviceChannel with the pusher in its process (as a job worker in the server) -----
async def channel_process(data_dir: str, port: int, undelivered_batch: int = 0) -> None:
    """DeviceChannel as `otaplane serve` starts it, minus HTTP; stdin: `push <firmware_pk> <ids,...>`
    runs push_many in a worker thread of this process (the listener wakes the channel at once)."""
    import logging

    import anyio

    from otaplane.devices.broker import DeviceChannel
    from otaplane.server import prepare
    from otaplane.services.container import Services
    from otaplane.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    services = Services.build(Settings(data_dir=Path(data_dir)))
    prepare(services)
    channel = DeviceChannel(services, LOOPBACK, port)
    if undelivered_batch:  # experiment: another page size of the undelivered sweep (default 2,000)
        channel.undelivered_batch = undelivered_batch
    await channel.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    snapshots = []
    try:
        while True:
            line = (await reader.readline()).decode().split()
            if not line or line[0] == "quit":
                break
            if line[0] == "snapshot":  # --tracemalloc: where the memory of the connections goes
                import tracemalloc

                snapshots.append(tracemalloc.take_snapshot())
                top = []
                if len(snapshots) > 1:
                    top = [(str(stat.traceback[0]), stat.size_diff, stat.count_diff)
                           for stat in snapshots[-1].compare_to(snapshots[-2], "lineno")[:25]]
                print(json.dumps({"top": top}), flush=True)
            if line[0] == "push":
                firmware_pk, ids = int(line[1]), [int(x) for x in line[2].split(",")]
                t0 = time.monotonic()
                pushed = await anyio.to_thread.run_sync(services.device_ota.push_many, firmware_pk, ids)
                print(json.dumps({"t0": t0, "pushed": [(p.device_id, p.message_id) for p in pushed]}), flush=True)
    finally:
        await channel.stop()
        services.close()


class ChannelProcess:
    """ServerProcess-like wrapper of channel_process."""

    def __init__(self, rundir: Path, port: int, undelivered_batch: int = 0):
        self.rundir, self.port, self.process, self.firmware_pk = rundir, port, None, None
        self.undelivered_batch = undelivered_batch
        self.tracemalloc = False
        self.log_path = rundir / "channel.log"

    def start(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **({"PYTHONTRACEMALLOC": "1"} if self.tracemalloc else {})}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--_channel", str(self.rundir / "data"), "--_port", str(self.port),
             "--undelivered-batch", str(self.undelivered_batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True, bufsize=1,
            env=env)
        self._answer(60)

    def snapshot(self) -> list:
        self.process.stdin.write("snapshot\n")
        self.process.stdin.flush()
        return self._answer(120)["top"]

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("channel process: no answer")
        return json.loads(self.process.stdout.readline())

    def push(self, device_ids: list[int]) -> tuple[float, list[tuple[int, int]]]:
        self.process.stdin.write(f"push {self.firmware_pk} {','.join(map(str, device_ids))}\n")
        self.process.stdin.flush()
        answer = self._answer(60)
        return answer["t0"], [tuple(x) for x in answer["pushed"]]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(20)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def logs(self, tail: int = 8) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])


# --- one size ------------------------------------------------------------------------------------
class Result(dict):
    pass


def latency_of(receipts, sent: dict[tuple[int, int], float]) -> tuple[list[float], int]:
    """Latencies of the receipts matching a push, and how many pushes were never received."""
    got: dict[tuple[int, int], float] = {}
    for index, message_id, at in receipts:
        key = (index, message_id)
        if key in sent and key not in got:
            got[key] = at - sent[key]
    return list(got.values()), len(sent) - len(got)


def paced_schedule(n: int, per_minute: int, seconds: int, ticks_per_second: int = 10) -> list[tuple[float, list[int]]]:
    """(offset s, device indexes) of each push batch: per_minute/60 a second, spread over
    ticks_per_second batches (so pushes fall at every phase of the server's poll), cycling
    through the N devices."""
    batches, cursor, owed = [], 0, 0.0
    for tick in range(seconds * ticks_per_second):
        owed += per_minute / 60 / ticks_per_second
        count, owed = int(owed), owed - int(owed)
        if count:
            batches.append((tick / ticks_per_second, [(cursor + k) % n for k in range(count)]))
            cursor = (cursor + count) % n
    return batches


def run_otaplane(n: int, args, workdir: Path, inprocess: bool = False) -> Result:
    from otaplane.services.container import Services
    from otaplane.services.firmware import NewFirmware
    from otaplane.services.products import NewProduct
    from otaplane.settings import Settings
    from otaplane.store import uploads

    rundir = workdir / f"otaplane-{n}{'-inproc' if inprocess else ''}"
    mqtt_port = common.free_port()
    if inprocess:
        server = channel = ChannelProcess(rundir, mqtt_port, args.undelivered_batch)
        channel.tracemalloc = args.tracemalloc
    else:
        server = common.otaplane_server(rundir, "", "--rate-limit", "0", "--mqtt-port", str(mqtt_port))
        server.env["OTAPLANE_MQTT_PORT"] = str(mqtt_port)
    label = "otaplane, in-process push"
    if inprocess and args.undelivered_batch:
        label += f" (undelivered batch {args.undelivered_batch:,})"
    result = Result(target=label if inprocess else "otaplane serve, poll", n=n)
    load = None
    services = None
    try:
        server.start()
        services = Services.build(Settings(data_dir=rundir / "data"))
        services.accounts.create_key("bench")
        tenant = services.accounts.tenant_by_name("bench")
        product = services.products.create(tenant, NewProduct(product_name=PRODUCT_NAME, node_type=0))
        pk = product.product_key
        started = time.perf_counter()
        apply_id = services.devices.batch_register(tenant, pk, n)
        devices = []
        for page in range(1, n // 1000 + 2):
            items = services.devices.apply_page(tenant, apply_id, page, 1000).items
            devices += [[pk, d.device_name, d.device_secret] for d in items]
            if len(items) < 1000:
                break
        creds = services.devices.credentials_many([(pk, d[1]) for d in devices])
        device_ids = [creds[(pk, d[1])].device_id for d in devices]
        index_of = {device_id: i for i, device_id in enumerate(device_ids)}
        result["register_s"] = time.perf_counter() - started
        content = b"bench firmware " * 100
        key = f"ota/{tenant.instance_id}/bench.bin"
        path = services.blobs.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        with services.db.begin() as conn:
            uploads.record(conn, key, tenant.instance_pk, int(time.time() * 1000))
        firmware = services.firmware.create(tenant, NewFirmware(
            product_key=pk, name="bench", dest_version="9.9.9", firmware_url=services.blobs.object_url(key)))
        with services.db.connect() as conn:
            import sqlalchemy as sa

            firmware_pk = conn.execute(sa.text("SELECT id FROM firmware WHERE firmware_id = :f"),
                                       {"f": firmware.firmware_id}).scalar_one()
        if inprocess:
            channel.firmware_pk = firmware_pk
        print(f"  otaplane N={n}: registered in {result['register_s']:.1f} s; connecting ...", file=sys.stderr)

        load = LoadProcess(devices, mqtt_port, "otaplane", args.window, rundir)
        time.sleep(1.0)
        rss_before = rss_kb(server.process.pid)
        spy = profile(args, n, server.process.pid, f"{'inproc' if inprocess else 'serve'}-{n}-connect.txt")
        if inprocess and args.tracemalloc:
            channel.snapshot()
        connect = load.ask("connect", timeout=args.connect_timeout)
        stop_profile(spy)
        if inprocess and args.tracemalloc:
            time.sleep(1.0)
            print(f"  tracemalloc, N={n}: growth during the connects, per device (top lines):", file=sys.stderr)
            for where, size, count in channel.snapshot():
                print(f"    {size / max(1, connect['connected']):8.0f} B {count / max(1, connect['connected']):6.1f} "
                      f"blocks  {where}", file=sys.stderr)
        result.update(connected=connect["connected"], connect_failed=connect["failed"],
                      connect_s=connect["elapsed"], failures=connect["failures"])
        # Pushes go only to devices whose row says ONLINE (written in batches after CONNACK).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with services.db.connect() as conn:
                online = conn.execute(sa.text("SELECT count(*) FROM devices WHERE online")).scalar_one()
            if online >= connect["connected"]:
                break
            time.sleep(0.2)
        result["online_s"] = time.monotonic() - (deadline - 60) + connect["elapsed"]
        time.sleep(1.0)
        result["rss_before_kb"] = rss_before
        result["rss_after_kb"] = rss_kb(server.process.pid)
        failed = set(connect["failed_indexes"])
        reachable = [device_ids[i] for i in range(n) if i not in failed]
        spy = profile(args, n, server.process.pid, f"{'inproc' if inprocess else 'serve'}-{n}-push.txt")
        run_pushes(result, load, channel.push if inprocess else local_pusher(services, firmware_pk), reachable,
                   index_of, n, args)
        stop_profile(spy)
    finally:
        if load:
            load.stop()
        if services:
            services.close()
        server.stop()
        log = server.logs(tail=8)
        if "Traceback" in log or "ERROR" in log:
            print(f"  last lines of the otaplane log:\n{log}", file=sys.stderr)
    return result


def profile(args, n: int, pid: int, name: str):
    """py-spy record (collapsed stacks, 50 Hz) of the server, for the largest N only."""
    if not args.profile or n != max(int(x) for x in args.sizes.split(",")):
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", "600", "-r", "50", "-f", "raw",
                            "-o", str(args.profile / name), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return spy


def stop_profile(spy) -> None:
    if spy is not None:
        import signal

        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(30)


def local_pusher(services, firmware_pk):
    def push(device_ids: list[int]) -> tuple[float, list[tuple[int, int]]]:
        t0 = time.monotonic()
        return t0, [(p.device_id, p.message_id) for p in services.device_ota.push_many(firmware_pk, device_ids)]
    return push


def run_pushes(result, load, push, device_ids, index_of, n, args) -> None:
    # burst
    t0, pushed = push(device_ids)
    sent = {(index_of[d], m): t0 for d, m in pushed}
    complete = load.wait_for(len(sent), args.burst_timeout)
    receipts = load.ask("dump")["receipts"]
    lat, missing = latency_of(receipts, sent)
    result.update(burst=len(sent), burst_missing=missing, burst_all_s=max(lat) if complete and lat else None,
                  burst_p50=pct(lat, 50), burst_p99=pct(lat, 99))
    # paced
    sent = {}
    schedule = paced_schedule(n, args.paced_rate, args.paced_seconds)
    start = time.monotonic()
    for offset, batch in schedule:
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t, pushed = push([device_ids[i] for i in batch])
        for d, m in pushed:
            sent[(index_of[d], m)] = t
    result["paced_window_s"] = args.paced_seconds
    load.wait_for(len(sent), args.burst_timeout)
    receipts = load.ask("dump")["receipts"]
    lat, missing = latency_of(receipts, sent)
    # a push superseded by a newer one to the same device before delivery counts as missing
    result.update(paced=len(sent), paced_missing=missing, paced_p50=pct(lat, 50), paced_p99=pct(lat, 99))


def run_stock(n: int, args, workdir: Path) -> Result:
    rundir = workdir / f"stock-{n}"
    rundir.mkdir(parents=True, exist_ok=True)
    port = common.free_port()
    pk = "stockPK"
    broker = subprocess.Popen([sys.executable, __file__, "--_stock", "--_port", str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                              stderr=open(rundir / "stock.log", "w"))
    result = Result(target="stock amqtt broadcast", n=n)
    load = None

    def ask(command, timeout=30):
        if command:
            broker.stdin.write(command + "\n")
            broker.stdin.flush()
        ready, _, _ = select.select([broker.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"stock broker: no answer to {command!r}")
        return json.loads(broker.stdout.readline())

    try:
        ask(None)
        devices = [[pk, f"dev{i}", ""] for i in range(n)]
        load = LoadProcess(devices, port, "stock", args.window, rundir)
        time.sleep(1.0)
        result["rss_before_kb"] = rss_kb(broker.pid)
        print(f"  stock amqtt N={n}: connecting ...", file=sys.stderr)
        connect = load.ask("connect", timeout=args.connect_timeout)
        result.update(connected=connect["connected"], connect_failed=connect["failed"],
                      connect_s=connect["elapsed"], failures=connect["failures"])
        time.sleep(1.0)
        result["rss_after_kb"] = rss_kb(broker.pid)
        # burst: one broadcast per device
        burst = min(n, args.stock_burst)
        t0 = ask(f"push 0 {burst} 1 {pk}")["t0"]
        failed = set(connect["failed_indexes"])
        sent = {(i, 1): t0 for i in range(burst) if i not in failed}
        complete = load.wait_for(len(sent), args.burst_timeout)
        lat, missing = latency_of(load.ask("dump")["receipts"], sent)
        result.update(burst=len(sent), burst_missing=missing, burst_all_s=max(lat) if complete and lat else None,
                      burst_p50=pct(lat, 50), burst_p99=pct(lat, 99))
        # paced
        sent = {}
        schedule = paced_schedule(n, args.paced_rate, args.paced_seconds)
        start = time.monotonic()
        for number, (offset, batch) in enumerate(schedule):
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tag = 100 + number
            # batches are contiguous index ranges except at the wrap: send them per range
            first, count = batch[0], len(batch)
            if first + count <= n:
                t = ask(f"push {first} {count} {tag} {pk}")["t0"]
                sent.update({(i, tag): t for i in batch})
            else:
                t = ask(f"push {first} {n - first} {tag} {pk}")["t0"]
                t2 = ask(f"push 0 {count - (n - first)} {tag} {pk}")["t0"]
                sent.update({(i, tag): (t if i >= first else t2) for i in batch})
        result["paced_window_s"] = args.paced_seconds
        sent = {k: v for k, v in sent.items() if k[0] not in failed}
        load.wait_for(len(sent), args.burst_timeout)
        lat, missing = latency_of(load.ask("dump")["receipts"], sent)
        result.update(paced=len(sent), paced_missing=missing, paced_p50=pct(lat, 50), paced_p99=pct(lat, 99))
    finally:
        if load:
            load.stop()
        with contextlib.suppress(Exception):
            broker.stdin.write("quit\n")
            broker.stdin.flush()
            broker.wait(10)
        if broker.poll() is None:
            broker.kill()
            broker.wait(10)
    return result


# --- report ----------------------------------------------------------------------------------------
def seconds(value) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.2f}"


def rows_of(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        per_device = ((r["rss_after_kb"] - r["rss_before_kb"]) * 1024 / r["connected"]) if r.get("connected") else 0
        burst_all = r.get("burst_all_s")
        burst_rate = f"{r['burst'] / burst_all:,.0f}" if burst_all else "-"
        paced_rate = r["paced"] / r["paced_window_s"] * 60 if r.get("paced_window_s") else 0
        rows.append([
            r["target"], f"{r['n']:,}", f"{r['connected']:,}" + (f" ({r['connect_failed']} failed)" if r["connect_failed"] else ""),
            f"{r['connected'] / r['connect_s']:,.0f}", f"{per_device / 1024:,.1f}",
            f"{r['burst']:,}", seconds(burst_all) if burst_all else f"> {r.get('burst_timeout', 0):g} ({r['burst_missing']} missing)",
            burst_rate, seconds(r["burst_p50"]), seconds(r["burst_p99"]),
            f"{paced_rate:,.0f}/min", seconds(r["paced_p50"]), seconds(r["paced_p99"]),
            str(r["paced_missing"]),
        ])
    return rows


HEADERS = ["target", "N", "connected", "connects/s", "KiB/device", "burst", "burst all s", "burst push/s",
           "burst p50 s", "burst p99 s", "paced rate", "paced p50 s", "paced p99 s", "paced missing"]


def verdicts(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r["target"].startswith("otaplane") and r["n"] >= TARGET_DEVICES:
            out.append(f"-- {r['target']}, N={r['n']:,}")
            ok_conn = r["connected"] >= TARGET_DEVICES
            ok_burst = bool(r.get("burst_all_s")) and r["burst_all_s"] < TARGET_BURST_S and not r["burst_missing"]
            ok_paced = r["paced_p99"] < TARGET_P99_S and not r["paced_missing"]
            out += [f"{TARGET_DEVICES:,} devices connected on one process: {'met' if ok_conn else 'NOT met'}",
                    f"burst of {r['burst']:,} pushes delivered in < {TARGET_BURST_S:g} s: "
                    f"{'met' if ok_burst else 'NOT met'} ({seconds(r.get('burst_all_s'))} s)",
                    f"{args_global.paced_rate:,} pushes/min with p99 < {TARGET_P99_S:g} s: "
                    f"{'met' if ok_paced else 'NOT met'} (p99 {seconds(r['paced_p99'])} s)"]
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="device counts for otaplane [1000,10000]")
    parser.add_argument("--stock-sizes", default="1000", help="device counts for the stock amqtt baseline [1000]; "
                                                               "empty: none")
    parser.add_argument("--stock-burst", type=int, default=10_000, help="cap of the baseline's burst [10000]")
    parser.add_argument("--quick", action="store_true", help="1,000 devices only, 5 s paced (under a minute)")
    parser.add_argument("--window", type=int, default=256, help="CONNECTs outstanding at once [256]")
    parser.add_argument("--paced-rate", type=int, default=TARGET_PACED_PER_MIN, help="pushes per minute [10000]")
    parser.add_argument("--paced-seconds", type=int, default=20, help="paced window [20]")
    parser.add_argument("--burst-timeout", type=float, default=45, help="max wait for deliveries [45]")
    parser.add_argument("--connect-timeout", type=float, default=180, help="max connect ramp [180]")
    parser.add_argument("--undelivered-batch", type=int, default=0,
                        help="experiment: page size of the in-process channel's undelivered sweep (default 2,000)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="in-process variant: print where the connections' Python memory goes (slow)")
    parser.add_argument("--inprocess-only", action="store_true", help="only the in-process variant")
    parser.add_argument("--no-inprocess", dest="inprocess", action="store_false",
                        help="skip the in-process push variant (DeviceChannel and push_many in one process)")
    parser.add_argument("--profile", type=Path, help="py-spy (collapsed stacks) of the server during the pushes of the "
                                                       "largest N into this directory")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    parser.add_argument("--_stock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_channel", help=argparse.SUPPRESS)
    parser.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.stock_sizes, args.paced_seconds = "1000", "1000", 5
    return args


args_global = None


def _run_loop(coroutine) -> None:
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)


def main(argv=None) -> int:
    global args_global
    args = args_global = parse_args(argv)
    fd_limit = raise_fd_limit()
    if args._load:
        _run_loop(load_worker(args._load, args._port, args._mode, args.window))
        return 0
    if args._stock:
        _run_loop(stock_broker(args._port))
        return 0
    if args._channel:
        _run_loop(channel_process(args._channel, args._port, args.undelivered_batch))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    stock_sizes = [int(s) for s in args.stock_sizes.split(",") if s]
    need = max(sizes + stock_sizes) + 500
    if fd_limit < need:
        raise SystemExit(f"open-files limit {fd_limit} < {need}: raise `ulimit -n`")
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory(prefix="otaplane-bench-devices-") as tmp:
        workdir = Path(tmp)
        for n in sorted(set(sizes) | set(stock_sizes)):
            if n in stock_sizes:
                r = run_stock(n, args, workdir)
                r["burst_timeout"] = args.burst_timeout
                results.append(r)
            if n in sizes:
                for inprocess in ([True] if args.inprocess_only else [False, True] if args.inprocess else [False]):
                    r = run_otaplane(n, args, workdir, inprocess)
                    r["burst_timeout"] = args.burst_timeout
                    results.append(r)
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    env = [
        ("cpus", f"{os.cpu_count()} x {common.cpu_model()}"),
        ("python", sys.version.split()[0]),
        ("amqtt", common._version("amqtt") + f" (uvloop {common._version('uvloop')} in every process)"),
        ("otaplane", f"{common._version('otaplane')}: `otaplane serve`, one worker, SQLite {sqlite3.sqlite_version}, "
                     "--rate-limit 0"),
        ("devices", "one load process, raw asyncio MQTT 3.1.1, QoS 1 PUBACK; "
                    f"{args.window} CONNECTs outstanding; keep-alive {KEEPALIVE} s"),
        ("pushes", "otaplane: push_many from the bench process (server's poll delivers); "
                   "stock: internal_message_broadcast"),
        ("paced", f"{args.paced_rate:,}/min for {args.paced_seconds} s (10 batches a second)"),
        ("limits", f"open files {fd_limit} (soft, raised to hard), somaxconn {somaxconn}"),
        ("load average", f"{load_start} at the start, "
                         + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " at the end (1, 5, 15 min)"),
    ]
    print()
    common.print_environment("otaplane device channel benchmark", env)
    common.print_table(HEADERS, rows_of(results))
    for r in results:
        if r.get("failures"):
            print(f"{r['target']} N={r['n']}: connect failures e.g. {r['failures']}")
    print()
    for line in verdicts(results):
        print("target: " + line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
