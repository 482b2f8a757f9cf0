"""The device channel through an external MQTT broker (OTAPLANE_MQTT_URL): for scale-out, the
devices connect to Mosquitto or EMQX, and otaplane is one privileged client of that broker.

- Upstream: otaplane subscribes (QoS 1) to `/ota/device/inform/+/+`, `/ota/device/progress/+/+`,
  `/sys/+/+/thing/ota/firmware/get`, `/sys/+/+/thing/file/download` (blocks of DownloadProtocol
  MQTT packages) and `/ota/device/request/+/+` (iotkit's legacy pull, whose answers on the same
  topic come back to otaplane too and are told apart by their `code`), as a shared subscription (`$share/<group>/...`, group
  OTAPLANE_MQTT_SHARE_GROUP, default `otaplane`) so that several otaplane processes split the
  messages instead of each handling all of them. Messages go through devices/upstream.py, the
  code the embedded broker uses. The device is named by the topic: the broker's ACL (the
  `/mqtt/acl` endpoint, devices/topics.py) must keep devices on their own topics.
- Authentication of devices is the broker's: it can call otaplane's `POST /mqtt/auth`
  (devices/http_auth.py) with the CONNECT's clientid, username and password.
- Downstream: pushes, firmware/get answers, file blocks and legacy pull answers are PUBLISHed at
  QoS 1 to `/ota/device/upgrade/{pk}/{dn}`, `/sys/{pk}/{dn}/thing/ota/firmware/get_reply`,
  `/sys/{pk}/{dn}/thing/file/download_reply` and `/ota/device/request/{pk}/{dn}`.
- Online state: the broker does not tell otaplane about connects, so devices never turn ONLINE;
  each upstream message stamps `last_seen_ms` (and activates a new device), which
  QueryDeviceDetail shows (Status OFFLINE once activated, the last-seen time in the details).

Pending packages: since otaplane cannot see who is connected, a push is published as soon as it
commits (this process) or within a poll interval (another process: the CLI, a replica), to any
device, and it counts as delivered once the broker acknowledges the QoS 1 PUBLISH (the broker
owns delivery from then on: a device with a persistent session gets it when it comes back, one
with a clean session does not). A publish that fails (broker down) is retried with an
exponential backoff (1 s to 60 s). Because a device that was offline at push time missed the
message, the package is published again when the device shows it is back: SDKs report their
version (`inform`) after each connect, and an `inform` that does not complete the pending package
re-publishes it (at most once per RE_OFFER_INTERVAL_S per device and push). `firmware/get`
answers with the pending package as always.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import anyio

from otaplane.devices import messages, topics
from otaplane.devices.batching import Batched, DeviceTurns
from otaplane.devices.upstream import DeviceGone
from otaplane.devices.upstream import handle as handle_upstream
from otaplane.services.device_ota import UNDELIVERED_BATCH, PendingKey, PendingPackage

log = logging.getLogger("otaplane.devices")

UPSTREAM_FILTERS = ("/ota/device/inform/+/+", "/ota/device/progress/+/+", "/sys/+/+/thing/ota/firmware/get",
                    "/sys/+/+/thing/file/download", "/ota/device/request/+/+")
# How often pushes made by another process (CLI, another replica) are looked for: the bound on
# their publish latency. Pushes of this process wake the channel at once.
PENDING_POLL_INTERVAL_S = 0.25
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0  # a failed push publish is retried with this backoff
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
RE_OFFER_INTERVAL_S = 30.0  # an `inform` re-publishes a device's pending push at most this often
SEEN_INTERVAL_S = 10.0  # last_seen_ms is written at most this often per device
IDENTITY_TTL_S = 30.0  # (pk, dn) -> device row cache
IDENTITY_CACHE_MAX = 100_000
DB_THREADS = 8
PUBLISH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = field(repr=False)

    def __str__(self) -> str:  # never the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:password]@]host[:port]` (1883) or `mqtts://...` (TLS, 8883)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError("OTAPLANE_MQTT_URL must be mqtt://[user:password@]host[:port] or mqtts://...")
    if not parts.hostname:
        raise ValueError("OTAPLANE_MQTT_URL names no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError("OTAPLANE_MQTT_URL has an invalid port") from None
    return BrokerAddress(parts.hostname, port, tls, unquote(parts.username) if parts.username else None,
                         unquote(parts.password) if parts.password is not None else None)


class _BrokerClient(aiomqtt.Client):
    """aiomqtt's client, dropping a message whose topic name is not one.

    Mosquitto and EMQX close a device that PUBLISHes to a topic name holding a wildcard
    ([MQTT-3.3.2-2]) or not in UTF-8, but a broker that forwarded one made aiomqtt raise inside
    paho's read loop, which then handled that same packet again and again: the channel spun and
    read no other message. Dropped here, the message is still acknowledged."""

    def _on_message(self, client, userdata, message) -> None:
        try:
            super()._on_message(client, userdata, message)
        except ValueError as problem:  # aiomqtt's Topic check, or a topic that is not UTF-8
            log.warning("dropped a message from the MQTT broker: %s", problem)


class ExternalChannel:
    """Same role as DeviceChannel (start/stop, deliver pushes, answer firmware/get), as a client."""

    def __init__(self, services: Any, url: str, share_group: str = "otaplane", connect_timeout_s: float = 10.0):
        self.services = services
        self.address = parse_mqtt_url(url)
        self.share_group = share_group.strip().strip("/")
        self.connect_timeout_s = connect_timeout_s
        self.client_id = f"otaplane-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._client: aiomqtt.Client | None = None
        self._connected: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._device_turn = DeviceTurns()  # one state change per device at a time
        self._limiter = anyio.CapacityLimiter(DB_THREADS)
        self._identities: dict[tuple[str, str], tuple[float, Any]] = {}
        self._retry: dict[PendingKey, tuple[float, float]] = {}  # key -> (next attempt, delay)
        self._seen: dict[int, float] = {}
        self._stopping = False
        self._reports = Batched(self, self._apply_reports)  # one transaction per batch
        self.undelivered_batch = UNDELIVERED_BATCH  # undelivered pushes read per query (page)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self.services.device_ota.add_listener(self._pushed)
        self.services.devices.add_removal_listener(self._removed)
        self._spawn(self._run())
        self._spawn(self._poll_loop())
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout_s)
        except TimeoutError:
            log.warning("external MQTT broker %s not reachable yet; retrying in the background", self.address)
        else:
            log.info("device channel through the external MQTT broker %s", self.address)

    async def stop(self) -> None:
        self._stopping = True
        self.services.device_ota.remove_listener(self._pushed)
        self.services.devices.remove_removal_listener(self._removed)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def is_online(self, device_id: int) -> bool:
        return False  # unknown through an external broker

    def _filters(self) -> list[tuple[str, int]]:
        prefix = f"$share/{self.share_group}/" if self.share_group else ""
        return [(prefix + f, 1) for f in UPSTREAM_FILTERS]

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        tls = ssl.create_default_context() if self.address.tls else None
        while not self._stopping:
            try:
                async with _BrokerClient(
                    self.address.host, self.address.port, identifier=self.client_id,
                    username=self.address.username, password=self.address.password,
                    clean_session=True, keepalive=30, timeout=self.connect_timeout_s, tls_context=tls,
                    max_inflight_messages=100, max_concurrent_outgoing_calls=200,
                ) as client:
                    await client.subscribe(self._filters())
                    self._client = client
                    assert self._connected is not None and self._wake is not None
                    self._connected.set()
                    self._wake.set()  # publish what is pending
                    delay = RECONNECT_MIN_S
                    log.info("connected to the MQTT broker %s as %s", self.address, self.client_id)
                    async for message in client.messages:
                        self._received(message.topic.value, message.payload)
            except aiomqtt.MqttError as problem:
                if self._stopping:
                    return
                log.warning("MQTT broker %s: %s; reconnecting in %.0f s", self.address, problem, delay)
            finally:
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    # --- upstream -------------------------------------------------------------------------------
    def _received(self, topic: str, payload: Any) -> None:
        upstream = topics.parse_upstream(topic)
        if upstream is None or not isinstance(payload, (bytes, bytearray)):
            return
        if len(payload) > messages.MAX_PAYLOAD_BYTES:
            log.warning("dropped a %d-byte message on %s", len(payload), topic)
            return
        self._spawn(self._handle(upstream, bytes(payload)))

    async def _identity(self, product_key: str, device_name: str):
        key = (product_key, device_name)
        now = time.monotonic()
        cached = self._identities.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        credentials = await self._db(self.services.devices.credentials, product_key, device_name)
        if len(self._identities) >= IDENTITY_CACHE_MAX:
            self._identities.clear()
        self._identities[key] = (now + IDENTITY_TTL_S, credentials)
        return credentials

    async def _handle(self, upstream: topics.UpstreamTopic, data: bytes) -> None:
        pk, dn = upstream.product_key, upstream.device_name
        try:
            credentials = await self._identity(pk, dn)
        except Exception:
            log.exception("message of %s/%s: device lookup failed", pk, dn)
            return
        if credentials is None or credentials.disabled:
            log.info("ignored %s from %s/%s: %s", upstream.kind.value, pk, dn,
                     "unknown device" if credentials is None else "device is disabled")
            return
        device_id = credentials.device_id
        await self._saw(device_id)
        try:
            handled = await handle_upstream(self.services, self._db, self._reports, self._device_turn, device_id,
                                            pk, dn, upstream, data, self._publish)
        except DeviceGone:
            # Deleted (and maybe registered again) through another replica, whose removal this
            # process's identity cache never heard of: look the name up afresh, try once more.
            self._forget_identity(device_id)
            credentials = await self._identity(pk, dn)
            if credentials is None or credentials.disabled or credentials.device_id == device_id:
                return
            try:
                handled = await handle_upstream(self.services, self._db, self._reports, self._device_turn,
                                                credentials.device_id, pk, dn, upstream, data, self._publish)
            except DeviceGone:
                return
            device_id = credentials.device_id
        if handled is not None and handled.kind is topics.Upstream.INFORM and not handled.completed:
            await self._re_offer(device_id, handled.module, handled.version)

    async def _saw(self, device_id: int) -> None:
        now = time.monotonic()
        if self._seen.get(device_id, 0.0) > now:
            return
        self._seen[device_id] = now + SEEN_INTERVAL_S
        if len(self._seen) >= IDENTITY_CACHE_MAX:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
        try:
            await self._db(self.services.devices.mark_seen, device_id)
        except Exception:
            log.exception("could not record that device %d was seen", device_id)

    async def _re_offer(self, device_id: int, module: str | None, version: str | None) -> None:
        """The device reported a version (it just connected, most likely): if its pending package
        for that module is another version, publish it again."""
        try:
            package = await self._db(self.services.device_ota.pushable, device_id, module)
        except Exception:
            log.exception("re-offer to device %d failed", device_id)
            return
        # An undelivered push is the sweep's (_deliver_undelivered): publishing it here too would
        # send it twice. A re-offer is for one that was delivered to nobody listening.
        if package is None or package.version == version or not package.delivered:
            return
        # At most once per RE_OFFER_INTERVAL_S whichever process gets the report (a shared
        # subscription spreads one device's messages over the processes).
        key = PendingKey(device_id, package.module_name, package.message_id)
        try:
            claimed, _ = await self._db(self.services.device_ota.claim, [key], "re_offered_ms", RE_OFFER_INTERVAL_S)
        except Exception:
            log.exception("re-offer to device %d failed", device_id)
            return
        if claimed:
            await self._deliver([package])

    # --- downstream -----------------------------------------------------------------------------
    def _removed(self, device_id: int) -> None:
        """DeviceService listener (any thread): a deleted device's cached identity goes at once,
        not after IDENTITY_TTL_S (its name may be registered again, its row id reused)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._forget_identity, device_id)

    def _forget_identity(self, device_id: int) -> None:
        for key in [key for key, (_, found) in self._identities.items() if found and found.device_id == device_id]:
            del self._identities[key]

    def _pushed(self, device_id: int) -> None:
        """DeviceOtaService listener (any thread): a push committed; publish without waiting."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _poll_loop(self) -> None:
        assert self._wake is not None
        while True:
            with anyio.move_on_after(PENDING_POLL_INTERVAL_S):
                await self._wake.wait()
            self._wake.clear()
            if self._client is None:
                continue
            try:
                await self._deliver_undelivered()
            except Exception:
                log.exception("pending package poll failed")

    async def _deliver_undelivered(self) -> None:
        """One sweep over the undelivered pushes, page after page (keyset: a page starts after
        the last key of the one before): a burst is not paced by the poll interval. Each page
        is published in its own task while the next page is read; pushes in flight or backing
        off are skipped (`_retry`)."""
        after: PendingKey | None = None
        live: set[PendingKey] = set()
        while not self._stopping and self._client is not None:
            keys: list[PendingKey] = await self._db(
                partial(self.services.device_ota.undelivered, limit=self.undelivered_batch, online_only=False,
                        after=after))
            live.update(keys)
            now = time.monotonic()
            wanted = [k for k in keys if self._retry.get(k, (0.0, 0.0))[0] <= now]
            for key in wanted:  # not again before this attempt ends (or its backoff runs out)
                delay = self._retry.get(key, (0.0, 0.0))[1]
                self._retry[key] = (now + PUBLISH_TIMEOUT_S + RETRY_MIN_S, delay)
            if wanted:
                # The other processes on this broker see the same pushes: publish those this one took.
                claimed, at_ms = await self._db(self.services.device_ota.claim, wanted, "publishing_ms",
                                                PUBLISH_TIMEOUT_S + RETRY_MIN_S)
                if claimed:
                    packages = await self._db(self.services.device_ota.packages, claimed)
                    self._spawn(self._deliver(packages, claimed_at_ms=at_ms))
            if len(keys) < self.undelivered_batch:  # the whole sweep seen: forget delivered or replaced
                self._retry = {k: v for k, v in self._retry.items() if k in live}
                return
            after = keys[-1]

    async def _deliver(self, packages: list[PendingPackage], claimed_at_ms: int | None = None) -> None:
        """Publish the pushes; those the broker acknowledged count as delivered. `claimed_at_ms`:
        the sweep's claim on them, given back for those that failed."""
        if not packages:
            return
        results = await asyncio.gather(*(
            self._publish(topics.upgrade_topic(p.product_key, p.device_name), messages.upgrade_push(p))
            for p in packages
        ))
        now = time.monotonic()
        acked, failed = [], []
        for package, ok in zip(packages, results):
            key = PendingKey(package.device_id, package.module_name, package.message_id)
            if ok:
                self._retry.pop(key, None)
                if not package.delivered:
                    acked.append((package.device_id, package.module_name, package.message_id))
            else:
                failed.append(key)
                delay = min(max(self._retry.get(key, (0.0, 0.0))[1] * 2, RETRY_MIN_S), RETRY_MAX_S)
                self._retry[key] = (now + delay, delay)
        if self._stopping:
            return
        if acked:
            await self._db(self.services.device_ota.mark_delivered, acked)
        if failed and claimed_at_ms is not None:
            await self._db(self.services.device_ota.release, failed, "publishing_ms", claimed_at_ms)

    async def _publish(self, topic: str, payload: bytes) -> bool:
        """PUBLISH at QoS 1; True once the broker acknowledged it."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
            return True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return False
        except Exception as problem:  # MqttError, timeout
            log.info("publishing on %s failed: %r", topic, problem)
            return False

    # --- helpers --------------------------------------------------------------------------------
    def _apply_reports(self, reports: list) -> list:
        return self.services.device_ota.apply_reports(reports)

    async def _db(self, function, *args, **kwargs):
        return await anyio.to_thread.run_sync(partial(function, *args, **kwargs), limiter=self._limiter)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
