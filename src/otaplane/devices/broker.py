"""The embedded device channel: an MQTT 3.1.1 broker (amqtt) in the server's event loop whose
clients are devices, speaking the OTA topics of device-protocol.md.

What it does:
- CONNECT: the Aliyun device signature (devices/auth.py) against the DeviceSecret; unknown,
  wrongly signed and disabled devices are refused. Online state goes to the device row.
- ACL: a device publishes and subscribes only its own topics (devices/topics.py).
- Server-side subscription: every device receives its `/ota/device/upgrade/...` and
  `.../firmware/get_reply` topics from CONNACK on, without sending SUBSCRIBE (`_ss=1`).
- Upstream: version reports, progress and firmware/get go to DeviceOtaService.
- Downstream: the pending packages of DeviceOtaService, on connect, at once when this process
  pushes, and within a poll interval (PENDING_POLL_INTERVAL_S) when another process (CLI,
  another replica) pushes; a burst is read page after page, without waiting between pages.

Delivery is exact-topic: a device's connection is found by its device id
(`DeviceChannel._by_device`) and the PUBLISH goes straight to its protocol handler. amqtt's
global subscription table stays empty, so nothing scans every subscription: not a push (amqtt's
broadcast matches each message against every filter), not a CONNECT (amqtt walks all filters
for retained messages at each connect), not a disconnect (it walks them to remove the
session's). Devices are never routed to each other, and retained messages are not kept.

CONNECT bursts (every device reconnecting after a restart): the credential lookups, the
ONLINE/OFFLINE writes and the pending-package reads of connections arriving together go to the
database in batches (`Batched`, a group commit), and the listen backlog is large.

Packets are read whole before amqtt parses them (`_PacketReader`): an oversize packet, or one that
amqtt would give up on halfway and then misread the rest of (a wildcard in a PUBLISH topic
name), closes the connection instead.

Built on amqtt 0.12's Broker internals (the overridden methods below); pyproject pins it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.packet import PUBLISH
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from otaplane.devices import auth, messages, topics
from otaplane.devices.batching import Batched, DeviceTurns
from otaplane.devices.upstream import DeviceGone
from otaplane.devices.upstream import handle as handle_upstream
from otaplane.services.device_ota import UNDELIVERED_BATCH, PendingKey, PendingPackage
from otaplane.store.disconnects import log_loop_failure

log = logging.getLogger("otaplane.devices")

# How often the channel looks for pushes made by another process (CLI, another replica): the
# bound on their delivery latency. Pushes of this process wake it at once. An idle look is one
# indexed query (no undelivered row).
PENDING_POLL_INTERVAL_S = 0.25
# A process that misses this many heartbeats is taken for dead: its devices go OFFLINE.
HEARTBEATS_TO_DEATH = 6
# While deliveries are in flight a sweep reads on from where the previous one ended; a sweep from
# the first undelivered row runs at least this often all the same (see _deliver_undelivered).
FULL_SWEEP_INTERVAL_S = 1.0
# A packet whose body is larger than this closes the connection before its body is read: the
# payload limit of device messages, and room for a PUBLISH's topic name and packet id.
MAX_PACKET_BODY = messages.MAX_PAYLOAD_BYTES + 1024
# Database work of the channel runs in worker threads; at most this many at once, leaving
# threads and pooled connections for HTTP requests.
DB_THREADS = 8
# Pending TCP connections the listener queues (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
# MQTT 3.1.1: the server closes a connection silent for 1.5 keep-alive periods.
KEEPALIVE_GRACE = 1.5
# The platform takes keep-alives of 30-1200 s: a device asking for none (0) or a longer one is
# still closed once silent that long, or a vanished device would hold its session ONLINE for good.
MAX_KEEPALIVE_S = 1200

_IDENTITY = "otaplane.device"  # Session.attributes: the authenticated DeviceIdentity
_CONNECTION = "otaplane.connection"  # Session.attributes: its Connection once connected
_HANDLER = "otaplane.handler"  # Session.attributes: the protocol handler serving it


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: int
    product_key: str
    device_name: str


@dataclass(eq=False)
class Connection:
    """One live device connection."""

    identity: DeviceIdentity
    session: Session
    handler: BrokerProtocolHandler
    ip_address: str | None
    online_ms: int | None = None  # set once the device row says ONLINE for this connection
    sent: set[int] = field(default_factory=set)  # push ids sent on this connection
    closed: bool = False

    @property
    def downstream(self) -> tuple[str, ...]:
        """The exact topics otaplane publishes to this device (topics.downstream_topics)."""
        return topics.downstream_topics(self.identity.product_key, self.identity.device_name)


class DeviceChannel:
    """Owns the broker and the device connections of this process."""

    def __init__(self, services: Any, host: str, port: int, certfile: str = "", keyfile: str = "",
                 connect_timeout_s: float = 10.0):
        self.services = services
        self.connect_timeout_s = connect_timeout_s
        self.host = host
        self.requested_port = port
        self.certfile = certfile
        self.keyfile = keyfile
        self.broker: DeviceBroker | None = None
        self._by_device: dict[int, Connection] = {}
        self._device_turn = DeviceTurns()  # one state change per device at a time
        self._tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter = anyio.CapacityLimiter(DB_THREADS)
        self._stopping = False
        # This process in the channel_nodes table: the devices it marks ONLINE name it, and its
        # heartbeat says they are still connected (services/devices.py channel_heartbeat).
        self.node_id = secrets.token_hex(8)
        self.heartbeat_s = services.settings.channel_heartbeat_seconds
        self.undelivered_batch = UNDELIVERED_BATCH  # undelivered pushes read per query (page)
        self._in_flight = 0  # _deliver calls running
        self._swept_to: PendingKey | None = None  # the last key the latest sweep read
        self._full_sweep_at = -math.inf  # loop time of the latest sweep from the first row
        # Connect bursts: the lookups and state writes of all CONNECTs that arrive while one batch
        # runs go to the database together, as one query or one transaction.
        self._credentials = Batched(self, self._credentials_batch)
        self._mark_connected = Batched(self, self._mark_connected_batch)
        self._mark_disconnected = Batched(self, self._mark_disconnected_batch)
        self._offers = Batched(self, self._offers_batch)
        # Device reports (inform, progress): one transaction per batch.
        self._reports = Batched(self, self._apply_reports)
        # Acknowledged pushes: one transaction per batch.
        self._delivered = Batched(self, self._mark_delivered_batch)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            # amqtt logs every connection, transitions every session state change, at INFO.
            for name in ("amqtt", "transitions"):
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.WARNING)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        listener: dict[str, Any] = {"type": "tcp", "bind": _bind(self.host, self.requested_port), "max_connections": 0}
        if self.certfile or self.keyfile:
            # One file given: it holds both certificate and key (one PEM); amqtt wants both names.
            listener.update(ssl=True, certfile=self.certfile or self.keyfile, keyfile=self.keyfile or self.certfile)
        config = {
            "listeners": {"default": listener},
            "plugins": {f"{__name__}.DeviceChannelPlugin": {"channel": self}},
            "timeout_disconnect_delay": 0,
        }
        self.broker = DeviceBroker(config, channel=self)
        await self.broker.start()
        self.services.device_ota.add_listener(self._pushed)
        self.services.devices.add_removal_listener(self._removed)
        await self._beat()
        self._spawn(self._poll_loop())
        self._spawn(self._heartbeat_loop())
        scheme = "mqtts" if listener.get("ssl") else "mqtt"
        log.info("device channel (embedded MQTT broker) on %s://%s:%d", scheme, self.host, self.port)

    async def stop(self) -> None:
        self._stopping = True
        self.services.device_ota.remove_listener(self._pushed)
        self.services.devices.remove_removal_listener(self._removed)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The broker's shutdown fires no disconnect events: say OFFLINE for every device here.
        gone = [(c.identity.device_id, c.online_ms) for c in self._by_device.values() if c.online_ms is not None]
        self._by_device.clear()
        try:
            if gone:
                await self._db(self.services.devices.mark_disconnected_many, gone)
            await self._db(self.services.devices.forget_channel, self.node_id)
        except Exception:
            log.exception("could not mark %d devices offline", len(gone))
        if self.broker is not None:
            await self.broker.shutdown()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        server = self.broker._servers.get("default") if self.broker else None  # noqa: SLF001
        if server is None or server.instance is None or not server.instance.sockets:
            return self.requested_port
        return server.instance.sockets[0].getsockname()[1]

    @property
    def online(self) -> int:
        return len(self._by_device)

    def is_online(self, device_id: int) -> bool:
        """Connected here, and the device row says so."""
        conn = self._by_device.get(device_id)
        return conn is not None and conn.online_ms is not None

    # --- CONNECT --------------------------------------------------------------------------------
    async def authenticate(self, session: Session) -> bool:
        session.attributes.pop(_IDENTITY, None)
        peer = session.remote_address
        try:
            login = auth.parse_login(session.client_id, session.username)
        except auth.LoginRefused as refusal:
            log.info("refused CONNECT from %s: %s", peer, refusal)
            return False
        try:
            credentials = await self._credentials((login.product_key, login.device_name))
        except Exception:
            log.exception("refused CONNECT of %s/%s: credentials lookup failed", login.product_key, login.device_name)
            return False
        who = f"{login.product_key}/{login.device_name} from {peer}"
        if credentials is None:
            log.info("refused CONNECT of %s: no such device", who)
            return False
        if not auth.verify(login, credentials.secret, session.password):
            log.info("refused CONNECT of %s: wrong password (%s)", who, login.sign_method)
            return False
        if credentials.disabled:
            log.info("refused CONNECT of %s: device is disabled", who)
            return False
        session.attributes[_IDENTITY] = DeviceIdentity(credentials.device_id, login.product_key, login.device_name)
        return True

    def may_access(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        identity: DeviceIdentity | None = session.attributes.get(_IDENTITY) if session else None
        if identity is None or topic is None:
            return False
        if action == Action.PUBLISH:
            allowed = topics.may_publish(topic, identity.product_key, identity.device_name)
        elif action == Action.SUBSCRIBE:
            allowed = topics.may_subscribe(topic, identity.product_key, identity.device_name)
        else:  # RECEIVE: otaplane only ever sends a device its own topics
            allowed = True
        if not allowed:
            log.info("device %s/%s may not %s %r", identity.product_key, identity.device_name, action, topic)
        return allowed

    async def connected(self, session: Session) -> None:
        identity: DeviceIdentity | None = session.attributes.get(_IDENTITY)
        handler = session.attributes.get(_HANDLER)
        if identity is None or handler is None or self._stopping:
            return
        conn = Connection(identity, session, handler, session.remote_address)
        session.attributes[_CONNECTION] = conn
        previous = self._by_device.get(identity.device_id)
        self._by_device[identity.device_id] = conn
        if previous is not None:  # one connection per device: the newer one wins, as on the platform
            previous.closed = True
            log.info("device %s/%s connected again; closing its older connection",
                     identity.product_key, identity.device_name)
            self._spawn(previous.handler.handle_connection_closed())
        try:
            if not await self._record_online(conn):
                return
            # Only now: a push committed after this read is found by the poller, which sees
            # the device here; one committed before is in `offers`.
            packages = await self._offers(identity.device_id)
            await self._deliver([(conn, p) for p in packages])
        except Exception:
            log.exception("connect of %s/%s: bookkeeping failed", identity.product_key, identity.device_name)

    async def _record_online(self, conn: Connection) -> bool:
        """The device row says ONLINE for this connection (held here); False when it closed first."""
        async with self._device_turn(conn.identity.device_id):
            if conn.closed:
                return False
            conn.online_ms = await self._mark_connected((conn.identity.device_id, conn.ip_address))
            return True

    async def disconnected(self, session: Session) -> None:
        conn: Connection | None = session.attributes.get(_CONNECTION)
        if conn is None:
            return
        conn.closed = True
        device_id = conn.identity.device_id
        if self._by_device.get(device_id) is conn:
            del self._by_device[device_id]
        if self._stopping:
            return
        try:
            async with self._device_turn(device_id):
                if conn.online_ms is not None:
                    await self._mark_disconnected((device_id, conn.online_ms))
        except Exception:
            log.exception("disconnect of device %d: bookkeeping failed", device_id)

    # --- upstream -------------------------------------------------------------------------------
    def received(self, session: Session | None, topic: str | None, data: bytes | bytearray | None) -> None:
        """A PUBLISH the ACL let through (or a will message): handled in its own task."""
        conn: Connection | None = session.attributes.get(_CONNECTION) if session else None
        if conn is None or conn.closed or topic is None or data is None:
            return
        identity = conn.identity
        if not topics.may_publish(topic, identity.product_key, identity.device_name):
            return  # e.g. a will message on someone else's topic: the ACL never checked it
        upstream = topics.parse_upstream(topic)
        if upstream is None:
            log.debug("ignored %s from %s/%s", topic, identity.product_key, identity.device_name)
            return
        self._spawn(self._handle(conn, upstream, bytes(data)))

    async def _handle(self, conn: Connection, upstream: topics.UpstreamTopic, data: bytes) -> None:
        identity = conn.identity
        try:
            await handle_upstream(self.services, self._db, self._reports, self._device_turn, identity.device_id,
                                  identity.product_key, identity.device_name, upstream, data,
                                  partial(self._send, conn))
        except DeviceGone:  # deleted by another process before this one's heartbeat noticed
            self._drop(identity.device_id)

    def _removed(self, device_id: int) -> None:
        """DevicesService listener (any thread): the device was deleted; its connection goes too.
        Its identity (the row id) must not outlive the row: SQLite may give the id to the next
        device registered, of any account, which the old connection would then act as."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drop, device_id)

    def _drop(self, device_id: int) -> None:
        conn = self._by_device.pop(device_id, None)
        if conn is None or conn.closed:
            return
        conn.closed = True
        log.info("device %s/%s was deleted; closing its connection", conn.identity.product_key,
                 conn.identity.device_name)
        self._spawn(conn.handler.handle_connection_closed())

    # --- downstream -----------------------------------------------------------------------------
    def _pushed(self, device_id: int) -> None:
        """DeviceOtaService listener (any thread): a push committed; deliver without waiting."""
        if self._loop is not None and self._wake is not None and device_id in self._by_device:
            self._loop.call_soon_threadsafe(self._wake.set)

    @property
    def _stale_ms(self) -> int:
        return int(self.heartbeat_s * HEARTBEATS_TO_DEATH * 1000)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await self._beat():
                    await self._mark_online_again()
                await self._drop_deleted()
            except Exception:
                log_loop_failure(log, "channel heartbeat")

    async def _drop_deleted(self) -> None:
        """Close the connections of devices deleted by another process (the CLI, another server
        on the same database): this process's deletions close them at once (_removed)."""
        held = list(self._by_device)
        if held:
            existing = await self._db(self.services.devices.existing_ids, held)
            for device_id in held:
                if device_id not in existing:
                    self._drop(device_id)

    async def _beat(self) -> bool:
        """Say this process is alive; release the devices of processes that died silently.
        False when this process was not known (first beat, or it was taken for dead)."""
        known, released = await self._db(self.services.devices.channel_heartbeat, self.node_id, self._stale_ms)
        if released:
            log.info("%d devices of a server process that stopped answering are OFFLINE now", released)
        return known

    async def _mark_online_again(self) -> None:
        """This process missed its heartbeats (a stall) and another one released its devices:
        the connections it still holds are ONLINE again."""
        held = [conn for conn in self._by_device.values() if conn.online_ms is not None and not conn.closed]
        log.warning("this server process was taken for dead; marking its %d devices ONLINE again", len(held))
        # Together: _mark_connected group-commits them (one transaction, not one per device).
        await asyncio.gather(*(self._record_online(conn) for conn in held))

    async def _poll_loop(self) -> None:
        assert self._wake is not None
        while True:
            with anyio.move_on_after(PENDING_POLL_INTERVAL_S):
                await self._wake.wait()
            self._wake.clear()
            if not self._by_device:
                continue
            try:
                await self._deliver_undelivered()
            except Exception:
                log_loop_failure(log, "pending package poll")

    async def _deliver_undelivered(self) -> None:
        """One sweep over the undelivered pushes, page after page (keyset: a page starts after
        the last key of the one before, so the rows just handed to `_deliver` are not read
        again): a burst is not paced by the poll interval. Each page's deliveries run in their
        own task while the next page is read. While deliveries of earlier sweeps are in flight,
        a sweep starts where the last one ended (at most FULL_SWEEP_INTERVAL_S apart, one starts
        from the beginning: rows that showed up behind that point, a push committed late or by
        a process whose clock is behind, or a row re-pushed since); pushes in flight that a
        sweep does read are skipped by `_deliverable` (no package is loaded for them)."""
        assert self._loop is not None
        now = self._loop.time()
        after: PendingKey | None = None
        if self._in_flight and self._swept_to is not None and now - self._full_sweep_at < FULL_SWEEP_INTERVAL_S:
            # Deliveries of earlier sweeps still run (a burst): read on from where the last
            # sweep ended instead of reading the rows in flight again, every poll.
            after = self._swept_to
        else:
            self._full_sweep_at = now
        while not self._stopping and self._by_device:
            keys: list[PendingKey] = await self._db(
                partial(self.services.device_ota.undelivered, limit=self.undelivered_batch, after=after))
            if keys:
                self._swept_to = keys[-1]
            wanted = [k for k in keys if self._deliverable(k)]
            if wanted:
                packages = await self._db(self.services.device_ota.packages, wanted)
                pairs = [(self._by_device[p.device_id], p) for p in packages if self._deliverable(p)]
                if pairs:
                    self._spawn(self._deliver(pairs))
            if len(keys) < self.undelivered_batch:
                return
            after = keys[-1]

    def _deliverable(self, item: PendingKey | PendingPackage) -> bool:
        conn = self._by_device.get(item.device_id)
        return conn is not None and not conn.closed and conn.online_ms is not None and item.message_id not in conn.sent

    async def _deliver(self, pairs: list[tuple[Connection, PendingPackage]]) -> None:
        """Push each package on its device's upgrade topic; note the acknowledged ones."""
        todo = []
        for conn, package in pairs:
            if package.message_id in conn.sent:
                continue
            conn.sent.add(package.message_id)  # at most once per connection, whoever finds it first
            todo.append((conn, package))
        if not todo:
            return
        self._in_flight += 1
        try:
            await asyncio.gather(*(self._push(conn, package) for conn, package in todo))
        finally:
            self._in_flight -= 1

    async def _push(self, conn: Connection, package: PendingPackage) -> None:
        """One push; once the device acknowledges it, its task is NOTIFIED (group-committed with
        the other acknowledgements of the moment, not held back until the slowest device of the
        batch has answered: by then the fast ones are already reporting progress)."""
        topic = topics.upgrade_topic(package.product_key, package.device_name)
        if not await self._send(conn, topic, messages.upgrade_push(package)) or self._stopping:
            return
        try:
            await self._delivered((package.device_id, package.module_name, package.message_id))
        except Exception:  # the row stays undelivered: pushed again at the device's next connect
            log.exception("recording the delivered push %d to device %d failed", package.message_id,
                          package.device_id)

    async def _send(self, conn: Connection, topic: str, payload: bytes) -> bool:
        """PUBLISH at QoS 1 straight to the device's handler; True once it is acknowledged."""
        if conn.closed or conn.handler.session is None or topic not in conn.downstream:
            return False
        try:
            await conn.handler.mqtt_publish(topic, payload, QOS_1, retain=False)
            return True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return False  # the connection closed while waiting for PUBACK
        except Exception as problem:
            log.info("sending %s to %s/%s failed: %r", topic, conn.identity.product_key, conn.identity.device_name,
                     problem)
            return False

    # --- batched database work (run in a worker thread) ----------------------------------------
    def _credentials_batch(self, names: list[tuple[str, str]]) -> list:
        found = self.services.devices.credentials_many(names)
        return [found.get(name) for name in names]

    def _mark_connected_batch(self, connections: list[tuple[int, str | None]]) -> list[int]:
        online_ms = self.services.devices.mark_connected_many(connections, self.node_id)
        return [online_ms] * len(connections)

    def _mark_disconnected_batch(self, connections: list[tuple[int, int]]) -> list[None]:
        self.services.devices.mark_disconnected_many(connections)
        return [None] * len(connections)

    def _offers_batch(self, device_ids: list[int]) -> list[list[PendingPackage]]:
        found = self.services.device_ota.offers_many(device_ids)
        return [found.get(device_id, []) for device_id in device_ids]

    def _mark_delivered_batch(self, items: list[tuple[int, str, int]]) -> list[None]:
        self.services.device_ota.mark_delivered(items)
        return [None] * len(items)

    # --- helpers --------------------------------------------------------------------------------
    def _apply_reports(self, reports: list) -> list:
        return self.services.device_ota.apply_reports(reports)

    async def _db(self, function, *args):
        return await anyio.to_thread.run_sync(partial(function, *args), limiter=self._limiter)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task




def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _PacketReader(StreamReaderAdapter):
    """amqtt reads a device's packets through this, which reads each packet whole first and
    closes the connection on what amqtt would mishandle:
    - a packet body over MAX_PACKET_BODY (it never reaches memory whole);
    - a remaining length of more than 4 bytes, and a PUBLISH whose topic name holds a wildcard
      ([MQTT-3.3.2-2]): amqtt 0.12 raises MQTTError in the middle of such a packet, drops the
      error, and reads the rest of the packet as the next ones, with the connection left open.
    amqtt's reads are then served from the packet: a read past its end comes back short (amqtt
    drops that packet), never from the next packet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(reader)
        self._writer = writer
        self._packet = b""  # the packet amqtt is reading
        self._offset = 0  # how much of it amqtt has read
        self._closed = False

    async def read(self, n: int = -1) -> bytes:
        if self._closed:  # bytes still buffered after a refusal are never parsed
            raise asyncio.IncompleteReadError(b"", n)
        if self._offset == len(self._packet):
            self._packet, self._offset = await self._next_packet(), 0
        end = len(self._packet) if n < 0 else self._offset + n
        data = self._packet[self._offset:end]
        self._offset += len(data)
        return data

    async def _next_packet(self) -> bytes:
        read = self._reader.readexactly
        header = bytearray(await read(1))
        try:  # from here on, an interrupted read would leave the stream in the middle of a packet
            length, multiplier = 0, 1
            while True:
                if len(header) > 4:
                    self._refuse("a remaining length of more than 4 bytes [MQTT-2.2.3]")
                byte = (await read(1))[0]
                header.append(byte)
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                if not byte & 0x80:
                    break
            if length > MAX_PACKET_BODY:
                self._refuse(f"a packet of more than {MAX_PACKET_BODY} bytes")
            body = await read(length)
        except asyncio.CancelledError:  # amqtt's keep-alive timeout: the device is closed anyway
            self._closed = True
            raise
        if header[0] >> 4 == PUBLISH:
            self._check_topic_name(body)
        return bytes(header) + body

    def _check_topic_name(self, body: bytes) -> None:
        """[MQTT-3.3.2-2]: a topic name holds no wildcard (a topic filter may)."""
        topic = body[2:2 + int.from_bytes(body[:2], "big")]
        if b"+" in topic or b"#" in topic:
            self._refuse(f"a PUBLISH to {topic[:200].decode(errors='replace')!r}, a topic name with a wildcard"
                         " [MQTT-3.3.2-2]")

    def _refuse(self, what: str) -> None:
        log.warning("closing the connection of %s: %s", self._writer.get_extra_info("peername"), what)
        self._closed = True
        self._writer.transport.abort()
        raise asyncio.IncompleteReadError(b"", None)


class DeviceBroker(Broker):
    """amqtt's broker with devices' semantics: clean sessions, exact-topic delivery, no
    device-to-device routing, no retained messages, keep-alive enforced, bounded packets."""

    def __init__(self, config: dict[str, Any], channel: DeviceChannel):
        super().__init__(config)
        self.channel = channel

    async def _create_server_instance(self, listener_name, listener_type, address, port, ssl_context):
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        # asyncio's default backlog (100) drops SYNs when many devices reconnect at once (after a
        # restart): they retry a second or more later.
        return await asyncio.start_server(partial(self.stream_connected, listener_name=listener_name), address, port,
                                          reuse_address=True, ssl=ssl_context, backlog=LISTEN_BACKLOG)

    async def stream_connected(self, reader, writer, listener_name: str) -> None:
        await self._client_connected(listener_name, _PacketReader(reader, writer), StreamWriterAdapter(writer))

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        """Every connection gets a new, clean session, and no existing session is touched before
        the new one authenticates (amqtt deletes a same-clientId session here, before auth)."""
        try:
            handler, session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                self.channel.connect_timeout_s)
        except TimeoutError:
            log.info("closing %s:%s: no CONNECT in time", remote_address, remote_port)
            await writer.close()
            raise AMQTTError("no CONNECT") from None
        except MQTTError as exc:
            log.debug("invalid CONNECT from %s:%s: %s", remote_address, remote_port, exc)
            await writer.close()
            raise
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        if not session.client_id:
            session.client_id = gen_client_id()
        session.clean_session = True
        session.parent = 0
        return handler, session

    async def _handle_client_session(self, reader, writer, client_session, handler, server, listener_name) -> None:
        client_session.attributes[_HANDLER] = handler
        keep_alive = client_session.keep_alive
        if not 0 < keep_alive <= MAX_KEEPALIVE_S:  # none (0), or past the platform's longest: its longest
            keep_alive = MAX_KEEPALIVE_S
        client_session.keep_alive = math.ceil(keep_alive * KEEPALIVE_GRACE)
        handler.handle_read_timeout = partial(self._keepalive_expired, handler)
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
        finally:
            if _IDENTITY not in client_session.attributes:  # refused: amqtt keeps the session around
                entry = self._sessions.get(client_session.client_id)
                if entry is not None and entry[0] is client_session:
                    del self._sessions[client_session.client_id]

    def _keepalive_expired(self, handler: BrokerProtocolHandler) -> None:
        session = handler.session
        log.info("closing %s: silent for 1.5 keep-alive periods", session.client_id if session else "a connection")
        self.channel._spawn(handler.handle_connection_closed())  # noqa: SLF001

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Grant (QoS 0 or 1) what the ACL allows; nothing is recorded: a device receives its own
        OTA topics anyway, and no one else publishes to it."""
        topic_filter, qos = subscription
        levels = topic_filter.split("/")
        if any(("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+")
               for i, level in enumerate(levels)):
            return 0x80
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return 0x80
        return min(qos, QOS_1)

    async def _del_all_subscriptions(self, session: Session) -> None:
        return None

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        return 0

    async def _broadcast_message(self, session, topic, data, force_qos=None) -> None:
        """Messages from devices go to otaplane only (never to other clients)."""
        self.channel.received(session, topic, data)

    async def retain_message(self, source_session, topic_name, data, qos=None) -> None:
        return None

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        return None


class DeviceChannelPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt's plugin hooks, handed to the DeviceChannel in the plugin config."""

    @dataclass
    class Config:
        channel: Any = None

    @property
    def channel(self) -> DeviceChannel:
        return self.config.channel

    async def authenticate(self, *, session: Session) -> bool | None:
        return await self.channel.authenticate(session)

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        return self.channel.may_access(session, topic, action)

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        await self.channel.connected(client_session)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        await self.channel.disconnected(client_session)
