"""The fleet: its devices registered (or reused) through the OpenAPI, then N simulated devices
run in one asyncio loop until a deadline or a stop signal.

Registration: `QueryDevice` pages list the product's devices with their DeviceSecret; those
named `{prefix}{i:06d}` are reused, the missing ones are created with `RegisterDevice` (this
server's `BatchRegisterDevice` only makes generated names), a few calls at a time. Nothing
is written to disk.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from otaplane.client import ApiCallError, OtaplaneClient
from otaplane.sim.device import Behaviour, Downloader, SimDevice
from otaplane.sim.mqtt import MqttClient, aliyun_login
from otaplane.sim.stats import Stats, write_json

log = logging.getLogger("otaplane.sim.fleet")

QUERY_PAGE_SIZE = 50  # QueryDevice's maximum
REGISTER_THREADS = 8
RETRYABLE = {"Throttling.User", "Throttling", "ServiceUnavailable", "InternalError"}
NAME_TAKEN = "iot.device.AlreadyExistedDeviceName"
NOT_FOUND = "iot.device.NotExistedDevice"


@dataclass(frozen=True)
class DeviceIdentity:
    name: str
    secret: str


def device_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(1, count + 1)]


def existing_devices(client: OtaplaneClient, product_key: str, pool: ThreadPoolExecutor,
                     first_page: dict | None = None) -> dict[str, str]:
    """DeviceName -> DeviceSecret of every device of the product (QueryDevice pages, a few at once)."""

    def page(number: int) -> dict:
        return _call(client, "QueryDevice", {"ProductKey": product_key, "CurrentPage": number,
                                             "PageSize": QUERY_PAGE_SIZE})

    first = first_page if first_page is not None else page(1)
    found: dict[str, str] = {}
    for body in [first, *pool.map(page, range(2, int(first.get("PageCount") or 0) + 1))]:
        for info in body.get("Data", {}).get("DeviceInfo", []):
            found[info["DeviceName"]] = info.get("DeviceSecret", "")
    return found


def _lookup(client: OtaplaneClient, product_key: str, name: str) -> str | None:
    try:
        return _call(client, "QueryDeviceInfo", {"ProductKey": product_key, "DeviceName": name})["Data"]["DeviceSecret"]
    except ApiCallError as error:
        if error.code != NOT_FOUND:
            raise
        return None


def _call(client: OtaplaneClient, action: str, params: dict, attempts: int = 8) -> dict:
    delay = 0.2
    for attempt in range(attempts):
        try:
            return client.call(action, params)
        except ApiCallError as error:
            if error.code not in RETRYABLE or attempt == attempts - 1:
                raise
        time.sleep(delay)
        delay = min(5.0, delay * 2)
    raise AssertionError("unreachable")


def _register(client: OtaplaneClient, product_key: str, name: str) -> str:
    try:
        return _call(client, "RegisterDevice", {"ProductKey": product_key, "DeviceName": name})["Data"]["DeviceSecret"]
    except ApiCallError as error:
        if error.code != NAME_TAKEN:  # someone else registered it meanwhile: read its secret
            raise
        return _call(client, "QueryDeviceInfo", {"ProductKey": product_key, "DeviceName": name})["Data"]["DeviceSecret"]


def ensure_devices(client: OtaplaneClient, product_key: str, count: int, prefix: str = "sim-",
                   progress: Callable[[str], None] | None = None) -> tuple[list[DeviceIdentity], int]:
    """The `count` devices `{prefix}000001`...: (identities in order, how many were registered now).
    The product's devices are listed page by page, or, when that takes more calls than there are
    devices to find, looked up by name."""
    names = device_names(prefix, count)
    first = _call(client, "QueryDevice", {"ProductKey": product_key, "CurrentPage": 1, "PageSize": QUERY_PAGE_SIZE})
    with ThreadPoolExecutor(REGISTER_THREADS) as pool:
        if count < int(first.get("PageCount") or 0):  # a few devices of a big product: ask for each by name
            existing = {n: s for n, s in zip(names, pool.map(lambda n: _lookup(client, product_key, n), names),
                                             strict=True) if s}
        else:
            existing = existing_devices(client, product_key, pool, first)
        missing = [n for n in names if not existing.get(n)]
        if progress:
            progress(f"{count - len(missing)} devices reused, {len(missing)} to register")
        secrets = pool.map(lambda n: _register(client, product_key, n), missing)
        for done, (name, secret) in enumerate(zip(missing, secrets, strict=True), start=1):
            existing[name] = secret
            if progress and done % 1000 == 0 and done < len(missing):
                progress(f"registered {done}/{len(missing)}")
    return [DeviceIdentity(n, existing[n]) for n in names], len(missing)


# --- running -----------------------------------------------------------------------------------------
@dataclass
class FleetOptions:
    host: str
    port: int
    tls: bool = False
    keepalive: int = 60
    connect_window: int = 256
    download_concurrency: int = 100
    stats_file: Path | None = None
    per_device: bool = False


class Fleet:
    def __init__(self, product_key: str, identities: list[DeviceIdentity], behaviour: Behaviour,
                 options: FleetOptions):
        self.product_key = product_key
        self.identities = identities
        self.behaviour = behaviour
        self.options = options
        self.stats = Stats(devices=len(identities))
        self.devices: list[SimDevice] = []
        self.upgrades: set[asyncio.Task] = set()
        self._stats_problem: str | None = None  # the last failure to write the stats file, said once

    def snapshot(self) -> dict:
        versions = Counter(d.version for d in self.devices)
        per_device = {d.device_name: d.version for d in self.devices} if self.options.per_device else None
        return self.stats.snapshot(versions, per_device)

    def write_stats(self) -> None:
        if self.options.stats_file is not None:
            try:
                write_json(self.options.stats_file, self.snapshot())
            except OSError as exc:
                if str(exc) != self._stats_problem:  # rewritten every 0.2 s: said once, not each time
                    log.warning("cannot write %s: %s", self.options.stats_file, exc)
                self._stats_problem = str(exc)
            else:
                self._stats_problem = None

    def _client_for(self, device: SimDevice, gate: asyncio.Semaphore, ssl) -> MqttClient:
        secure_mode = 2 if ssl else 3

        def login():
            return aliyun_login(self.product_key, device.device_name, device.secret, secure_mode=secure_mode)

        return MqttClient(self.options.host, self.options.port, login, keepalive=self.options.keepalive, gate=gate,
                          ssl=ssl, on_connect=device.on_connect, on_message=device.on_message,
                          on_state=device.on_state)

    async def run(self, stop: asyncio.Event, duration: float | None = None,
                  report: Callable[[Stats], None] | None = None) -> dict:
        """Connect everyone (at most `connect_window` CONNECTs outstanding), run until `stop` is set
        or `duration` seconds passed, then disconnect; returns the final snapshot."""
        options = self.options
        ssl = None
        if options.tls:
            ssl = ssl_module.create_default_context()
            ssl.check_hostname = False
            ssl.verify_mode = ssl_module.CERT_NONE
        downloader = Downloader(options.download_concurrency) if self.behaviour.download else None
        gate = asyncio.Semaphore(max(1, options.connect_window))
        for index, identity in enumerate(self.identities):
            device = SimDevice(index, self.product_key, identity.name, identity.secret, self.behaviour, self.stats,
                               downloader, self.upgrades)
            device.client = self._client_for(device, gate, ssl)
            self.devices.append(device)
        self.stats.started_at = time.time()
        loop = asyncio.get_running_loop()
        connector = loop.create_task(self._connect_all(options.connect_window))
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not stop.is_set():
                now = time.monotonic()
                for device in self.devices:
                    device.client.tick(now)
                self.write_stats()
                if report is not None:
                    report(self.stats)
                if deadline is not None and now >= deadline:
                    break
                timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - now))
                try:
                    await asyncio.wait_for(stop.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        finally:
            connector.cancel()
            for task in list(self.upgrades):
                task.cancel()
            for device in self.devices:
                device.client.close()
            await asyncio.sleep(0.2)  # let the DISCONNECTs go out
            if downloader is not None:
                await downloader.close()
            self.write_stats()
        return self.snapshot()

    async def _connect_all(self, window: int) -> None:
        """Start each device's first connect, no more than `window` at once (each retries itself)."""
        slots = asyncio.Semaphore(max(1, window))
        pending: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()

        def done(task: asyncio.Task) -> None:
            pending.discard(task)
            slots.release()

        try:
            for device in self.devices:
                await slots.acquire()
                task = loop.create_task(device.client.connect())
                pending.add(task)
                task.add_done_callback(done)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            for task in list(pending):
                task.cancel()
            raise
