"""What a simulated device does on the OTA topics (device-protocol.md, section 1).

On each connect it reports its version on `/ota/device/inform/{pk}/{dn}` (and, with `pull`, asks
`/sys/{pk}/{dn}/thing/ota/firmware/get`). A package, pushed on `/ota/device/upgrade/{pk}/{dn}` or
answered on `.../firmware/get_reply`, starts an upgrade:

    progress steps[0] (the HTTP GET starts) -> download -> verify the checksum
    -> the remaining steps, `step_delay` apart -> report the new version

and the device runs that version for the rest of the run. A push with `"dProtocol":"mqtt"` is
downloaded in blocks on `/sys/{pk}/{dn}/thing/file/download` instead, as link-sdk-c 4.x does. A chosen fraction of upgrades fails at
`fail_step` instead: -2 in place of the download, -3 in place of the verification, -1 and -4
before the last step (the device keeps its version). A real download error reports -2, a checksum
mismatch -3. A message id the device already handled is not run again; neither is a package while
another upgrade of the device runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field

import aiohttp
import yarl

from otaplane.devices.messages import crc16_arc
from otaplane.sim.mqtt import MqttClient
from otaplane.sim.stats import Stats

log = logging.getLogger("otaplane.sim.device")

DEFAULT_MODULE = "default"
FAILURE_STEPS = (-1, -2, -3, -4)
FAILURE_DESC = {
    -1: "upgrade failed (simulated)",
    -2: "download failed",
    -3: "verify failed: checksum mismatch",
    -4: "burn failed (simulated)",
}
DOWNLOAD_ATTEMPTS = 3
MQTT_BLOCK_BYTES = 5120  # link-sdk-c 4.x's default request size
MQTT_BLOCK_TIMEOUT_S = 10.0  # and its wait for one block, asked at most DOWNLOAD_ATTEMPTS times
HANDLED_IDS_KEPT = 16  # message ids a device remembers (enough: a push id is per device and package)


@dataclass
class Behaviour:
    """How every device of the fleet behaves (the `otaplane sim` options)."""

    version: str = "1.0.0"
    module: str = DEFAULT_MODULE
    fail_rate: float = 0.0
    fail_step: int = -1
    progress_steps: tuple[int, ...] = (0, 50, 100)
    step_delay: float = 0.5
    download: bool = True
    verify_checksum: bool = True
    pull: bool = False
    rng: random.Random = field(default_factory=random.Random)


class DownloadFailed(Exception):
    def __init__(self, reason: str, retryable: bool = True):
        super().__init__(reason)
        self.retryable = retryable


class Downloader:
    """HTTP GETs of pushed URLs: at most `concurrency` at once, hashed while streaming.

    aiohttp rather than httpx: at 1,000 devices httpx's async client took ~13 ms of CPU per 4 KB
    download, most of the simulator's time (bench/rollout.py with --profile)."""

    def __init__(self, concurrency: int = 100, timeout_s: float = 60.0):
        self.gate = asyncio.Semaphore(max(1, concurrency))
        self.concurrency = max(1, concurrency)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None  # made on first use, inside the event loop

    async def fetch(self, url: str, sign_method: str, stats: Stats) -> tuple[str, int]:
        """(lowercase hex digest per `sign_method`, size)."""
        digest = hashlib.sha256() if sign_method.upper() == "SHA256" else hashlib.md5()
        size = 0
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency),
                                                 timeout=self.timeout)
        async with self.gate:
            try:
                # encoded=True: a presigned URL's query is signed as it is; it must not be re-quoted.
                async with self.session.get(yarl.URL(url, encoded=True)) as response:
                    if response.status != 200:
                        raise DownloadFailed(f"HTTP {response.status}", response.status >= 500)
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        digest.update(chunk)
                        size += len(chunk)
                        stats.download_bytes += len(chunk)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise DownloadFailed(repr(exc)) from None
        return digest.hexdigest(), size

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class SimDevice:
    """One device: its MQTT client, its version, and at most one upgrade at a time."""

    __slots__ = ("index", "product_key", "device_name", "secret", "behaviour", "stats", "downloader", "client",
                 "version", "handled", "upgrading", "next_id", "tasks", "topics", "block")

    def __init__(self, index: int, product_key: str, device_name: str, secret: str, behaviour: Behaviour,
                 stats: Stats, downloader: Downloader | None, tasks: set):
        self.index = index
        self.product_key = product_key
        self.device_name = device_name
        self.secret = secret
        self.behaviour = behaviour
        self.stats = stats
        self.downloader = downloader
        self.client: MqttClient | None = None
        self.version = behaviour.version
        self.handled: list[int] = []
        self.upgrading: str | None = None  # the version being installed
        self.next_id = 0
        self.tasks = tasks  # the fleet's running upgrades (kept referenced until done)
        self.block: asyncio.Future | None = None  # the download_reply awaited (MQTT download)
        pk, dn = product_key, device_name
        self.topics = {
            "inform": f"/ota/device/inform/{pk}/{dn}",
            "progress": f"/ota/device/progress/{pk}/{dn}",
            "get": f"/sys/{pk}/{dn}/thing/ota/firmware/get",
            "upgrade": f"/ota/device/upgrade/{pk}/{dn}",
            "get_reply": f"/sys/{pk}/{dn}/thing/ota/firmware/get_reply",
            "download": f"/sys/{pk}/{dn}/thing/file/download",
            "download_reply": f"/sys/{pk}/{dn}/thing/file/download_reply",
        }

    # --- upstream -------------------------------------------------------------------------------
    def _send(self, kind: str, params: dict, qos: int = 1) -> None:
        self.next_id += 1
        if self.behaviour.module != DEFAULT_MODULE:
            params = {**params, "module": self.behaviour.module}
        payload = json.dumps({"id": str(self.next_id), "params": params}, separators=(",", ":")).encode()
        self.client.publish(self.topics[kind], payload, qos)

    def inform(self) -> None:
        self._send("inform", {"version": self.version})

    def progress(self, step: int, desc: str = "") -> None:
        self._send("progress", {"step": str(step), "desc": desc})

    # --- MQTT callbacks -------------------------------------------------------------------------------
    def on_state(self, event: str) -> None:
        stats = self.stats
        if event == "connected":
            stats.device_connected(self.index)
        elif event == "disconnected":
            stats.connected -= 1
            stats.disconnects += 1
        elif event == "refused":
            stats.connect_refused += 1
        elif event == "failed":
            stats.connect_errors += 1

    def on_connect(self) -> None:
        self.inform()
        if self.behaviour.pull:
            self._send("get", {}, qos=0)

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics["download_reply"]:
            if self.block is not None and not self.block.done():
                self.block.set_result(payload)
            return
        if topic == self.topics["upgrade"]:
            pushed = True
        elif topic == self.topics["get_reply"]:
            pushed = False
        else:
            return
        try:
            body = json.loads(payload)
        except ValueError:
            log.warning("%s: a message on %s that is not JSON", self.device_name, topic)
            return
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not data.get("version"):
            return  # firmware/get: nothing pending
        if (data.get("module") or DEFAULT_MODULE) != self.behaviour.module:
            return
        self.stats.pushes += 1
        message_id = body.get("id") if pushed else None
        if message_id is not None and message_id in self.handled:
            self.stats.duplicates += 1
            return
        version = str(data["version"])
        if self.upgrading is not None:
            if self.upgrading == version:
                self.stats.duplicates += 1
            return  # one upgrade at a time
        if message_id is not None:
            self.handled.append(message_id)
            del self.handled[:-HANDLED_IDS_KEPT]
        if version == self.version:
            self.inform()  # already there: say so again
            return
        self.upgrading = version
        task = asyncio.get_running_loop().create_task(self._upgrade(data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- the upgrade ------------------------------------------------------------------------------------
    async def _upgrade(self, data: dict) -> None:
        b, stats = self.behaviour, self.stats
        stats.upgrades_started += 1
        stats.in_progress += 1
        fail_at = b.fail_step if b.fail_rate > 0 and b.rng.random() < b.fail_rate else None
        steps = list(b.progress_steps) or [100]
        try:
            outcome = await self._run(data, steps, fail_at)
        except Exception:  # a bug here must not take the fleet down
            log.exception("%s: upgrade crashed", self.device_name)
            outcome = -1
            self.progress(-1, FAILURE_DESC[-1])
        finally:
            stats.in_progress -= 1
            self.upgrading = None
        if outcome == 0:
            stats.succeeded += 1
        else:
            stats.failed += 1

    async def _fail(self, step: int, desc: str | None = None) -> int:
        self.progress(step, desc or FAILURE_DESC[step])
        return step

    async def _download(self, url: str, method: str) -> str:
        """The digest; a connection error or a 5xx is tried again (the SDKs resume), a 4xx is final."""
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                digest, _ = await self.downloader.fetch(url, method, self.stats)
                return digest
            except DownloadFailed as exc:
                if not exc.retryable or attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise
                self.stats.download_retries += 1
                log.info("%s: download failed (%s), again", self.device_name, exc)
                await asyncio.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    async def _mqtt_block(self, stream_id: int, file_id: int, offset: int) -> tuple[dict, bytes]:
        """One block: (JSON header, data), the CRC checked; asked again after a timeout or a bad
        reply, as the SDK does."""
        request = json.dumps({"id": str(self.next_id), "version": "1.0", "params": {
            "fileToken": "default", "fileInfo": {"streamId": stream_id, "fileId": file_id},
            "fileBlock": {"size": MQTT_BLOCK_BYTES, "offset": offset}}}, separators=(",", ":")).encode()
        problem = "no reply"
        for _attempt in range(DOWNLOAD_ATTEMPTS):
            self.block = asyncio.get_running_loop().create_future()
            self.client.publish(self.topics["download"], request, 0)
            try:
                reply = await asyncio.wait_for(self.block, MQTT_BLOCK_TIMEOUT_S)
            except TimeoutError:
                problem = "no reply"
                continue
            finally:
                self.block = None
            length = int.from_bytes(reply[:2], "big")
            try:
                header = json.loads(reply[2:2 + length])
            except ValueError:
                problem = "a reply header that is not JSON"
                continue
            data = reply[2 + length:-2]
            if header.get("code") != 200:
                raise DownloadFailed(f"block at {offset}: code {header.get('code')}", retryable=False)
            if int.from_bytes(reply[-2:], "little") != crc16_arc(data) or header["data"].get("bOffset") != offset:
                problem = "a block with a wrong CRC or offset"
                continue
            return header, data
        raise DownloadFailed(f"block at {offset}: {problem}")

    async def _mqtt_download(self, stream_id: int, file_id: int, method: str) -> str:
        """The digest of a file read block by block over MQTT (DownloadProtocol MQTT)."""
        digest = hashlib.sha256() if method.upper() == "SHA256" else hashlib.md5()
        offset, length = 0, None
        while length is None or offset < length:
            header, data = await self._mqtt_block(stream_id, file_id, offset)
            length = header["data"]["fileLength"]
            if not data and offset < length:
                raise DownloadFailed(f"an empty block at {offset} of {length}", retryable=False)
            digest.update(data)
            offset += len(data)
            self.stats.download_bytes += len(data)
        return digest.hexdigest()

    async def _run(self, data: dict, steps: list[int], fail_at: int | None) -> int:
        b, stats = self.behaviour, self.stats
        self.progress(steps[0])
        await asyncio.sleep(b.step_delay)
        # download (and verify)
        if fail_at == -2:
            return await self._fail(-2)
        if b.download:
            files = data.get("files") or [{"fileUrl": data.get("url"), "fileSign": data.get("sign") or data.get("md5")}]
            method = data.get("signMethod") or "Md5"
            over_mqtt = data.get("dProtocol") == "mqtt"
            for item in files:
                if not over_mqtt and not item.get("fileUrl"):
                    return await self._fail(-2, "no url in the push")
                try:
                    if over_mqtt:
                        digest = await self._mqtt_download(data["streamId"], data.get("streamFileId", 1), method)
                    else:
                        digest = await self._download(item["fileUrl"], method)
                except DownloadFailed as exc:
                    stats.download_failures += 1
                    log.warning("%s: download failed: %s", self.device_name, exc)
                    return await self._fail(-2, f"download failed: {exc}"[:200])
                stats.downloads += 1
                expected = str(item.get("fileSign") or "").lower()
                if b.verify_checksum and fail_at != -3 and digest != expected:
                    stats.checksum_mismatches += 1
                    return await self._fail(-3)
        if fail_at == -3:
            return await self._fail(-3)
        # the rest of the steps; "flashing" before the last one
        for step in steps[1:-1]:
            self.progress(step)
            await asyncio.sleep(b.step_delay)
        if fail_at in (-1, -4):
            return await self._fail(fail_at)
        if len(steps) > 1:
            self.progress(steps[-1])
            await asyncio.sleep(b.step_delay)
        self.version = str(data["version"])
        self.inform()
        return 0
