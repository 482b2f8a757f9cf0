"""A minimal asyncio MQTT 3.1.1 client, cheap enough to hold 10,000 connections in one process.

Just what a simulated Aliyun device needs: CONNECT with the Aliyun device signature
(`aliyun_login`), PUBLISH at QoS 0/1 (QoS 1 kept until PUBACK and sent again with DUP after a
reconnect), PUBACK for what the server sends at QoS 1, PINGREQ keepalive, reconnect with
exponential backoff. No SUBSCRIBE: the otaplane channel subscribes devices itself (`_ss=1`).

One `MqttClient` is the asyncio Protocol of every connection it makes (no task per connection,
no timer per connection): keepalive and the CONNACK deadline run from `tick`, which the owner
calls about once a second for all its clients. The packet codec is pure functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import ssl as ssl_module
import time
from collections.abc import Callable

log = logging.getLogger("otaplane.sim.mqtt")

# --- packet types (high nibble of the fixed header) ------------------------------------------------
CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x80, 0x90, 0xC0, 0xD0, 0xE0
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
MAX_REMAINING = 268_435_455  # 4 bytes of remaining length

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class ProtocolError(ValueError):
    """The peer sent something that is not MQTT 3.1.1."""


# --- codec -----------------------------------------------------------------------------------------
def encode_remaining_length(n: int) -> bytes:
    if n < 0 or n > MAX_REMAINING:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_remaining_length(buf: bytes | bytearray, offset: int = 1) -> tuple[int, int] | None:
    """(length, offset of the first body byte), or None when `buf` does not hold it all yet."""
    length, shift, i = 0, 0, offset
    while True:
        if i >= len(buf):
            return None
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return length, i
        shift += 7
        if shift > 21:
            raise ProtocolError("remaining length longer than 4 bytes")


def encode_string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int,
                   clean_session: bool = True) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = encode_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += encode_string(username)
        if password is not None:
            flags |= 0x40
            payload += encode_string(password)
    body = encode_string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return packet(CONNECT, body)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, dup: bool = False,
                   retain: bool = False) -> bytes:
    if qos not in (0, 1):
        raise ValueError("QoS 0 or 1 only")
    first = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = encode_string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return packet(first, body)


def subscribe_packet(topic_filter: str, packet_id: int = 1, qos: int = 1) -> bytes:
    """One SUBSCRIBE (the simulator never sends it; the load benchmark's stock-broker mode does)."""
    return packet(SUBSCRIBE | 0x02, packet_id.to_bytes(2, "big") + encode_string(topic_filter) + bytes([qos]))


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def parse_connack(body: bytes) -> tuple[bool, int]:
    """(session present, return code)."""
    if len(body) != 2:
        raise ProtocolError("CONNACK is not 2 bytes")
    return bool(body[0] & 1), body[1]


def parse_publish(first_byte: int, body: bytes) -> tuple[str, bytes, int, int | None]:
    """(topic, payload, qos, packet id or None at QoS 0)."""
    qos = (first_byte >> 1) & 3
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if len(body) < 2:
        raise ProtocolError("PUBLISH too short")
    topic_length = int.from_bytes(body[:2], "big")
    offset = 2 + topic_length
    if len(body) < offset + (2 if qos else 0):
        raise ProtocolError("PUBLISH too short")
    try:
        topic = body[2:offset].decode()
    except UnicodeDecodeError:
        raise ProtocolError("topic is not UTF-8") from None
    packet_id = None
    if qos:
        packet_id = int.from_bytes(body[offset:offset + 2], "big")
        offset += 2
    return topic, body[offset:], qos, packet_id


class PacketReader:
    """Splits a byte stream into packets: `feed(data)` returns [(first byte, body), ...]."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buffer
        buf += data
        packets = []
        start = 0
        while len(buf) - start >= 2:
            decoded = decode_remaining_length(buf, start + 1)
            if decoded is None:
                break
            length, body_start = decoded
            end = body_start + length
            if len(buf) < end:
                break
            packets.append((buf[start], bytes(buf[body_start:end])))
            start = end
        if start:
            del buf[:start]
        return packets


# --- Aliyun device login ---------------------------------------------------------------------------
SIGN_METHODS = {"hmacmd5": hashlib.md5, "hmacsha1": hashlib.sha1, "hmacsha256": hashlib.sha256}


def aliyun_login(product_key: str, device_name: str, device_secret: str, *, sign_method: str = "hmacsha1",
                 timestamp: str | None = None, secure_mode: int = 3) -> tuple[str, str, str]:
    """(clientId, username, password) as the Python Link Kit SDK sends them (device-protocol.md, 2)."""
    if timestamp is None:
        timestamp = str(int(time.time() * 1000))
    bare = f"{product_key}&{device_name}"
    client_id = f"{bare}|securemode={secure_mode},signmethod={sign_method},_ss=1,timestamp={timestamp}|"
    content = f"clientId{bare}deviceName{device_name}productKey{product_key}timestamp{timestamp}"
    password = hmac.new(device_secret.encode(), content.encode(), SIGN_METHODS[sign_method]).hexdigest()
    return client_id, f"{device_name}&{product_key}", password


# --- the client ------------------------------------------------------------------------------------
class MqttClient(asyncio.Protocol):
    """One device's connection, reconnected with backoff until `close()`.

    Callbacks: `on_connect()` after each accepted CONNACK, `on_message(topic, payload)` for each
    PUBLISH, `on_state(event)` for "connected", "disconnected", "refused" (CONNACK code), "failed"
    (TCP connect or CONNACK timed out, or the connection failed) for the stats."""

    __slots__ = (
        "host", "port", "ssl", "login", "keepalive", "gate", "on_connect", "on_message", "on_state",
        "transport", "reader", "connected", "closing", "next_packet_id", "inflight", "last_sent",
        "last_received", "connack_deadline", "backoff", "backoff_max", "_gate_held", "_outcome", "_retry", "loop",
    )

    def __init__(self, host: str, port: int, login: Callable[[], tuple[str, str, str]], *, keepalive: int = 60,
                 gate: asyncio.Semaphore | None = None, ssl: ssl_module.SSLContext | None = None,
                 on_connect: Callable[[], None] | None = None,
                 on_message: Callable[[str, bytes], None] | None = None,
                 on_state: Callable[[str], None] | None = None,
                 backoff_max: float = 30.0):
        self.host, self.port, self.ssl = host, port, ssl
        self.login = login  # called for each CONNECT: a fresh timestamp every time
        self.keepalive = keepalive
        self.gate = gate
        self.on_connect = on_connect
        self.on_message = on_message
        self.on_state = on_state
        self.transport: asyncio.Transport | None = None
        self.reader = PacketReader()
        self.connected = False
        self.closing = False
        self.next_packet_id = 0
        self.inflight: dict[int, tuple[str, bytes]] = {}  # QoS 1 publishes awaiting PUBACK
        self.last_sent = 0.0
        self.last_received = 0.0
        self.connack_deadline: float | None = None
        self.backoff = 0.0
        self.backoff_max = backoff_max
        self._gate_held = False
        self._outcome: asyncio.Future | None = None
        self._retry: asyncio.Task | None = None  # a reconnect attempt in flight (referenced until done)
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- connecting ---------------------------------------------------------------------------
    async def connect(self, timeout: float = 30.0) -> bool:
        """One attempt: TCP connect, CONNECT, wait for CONNACK. True when accepted. On failure the
        client schedules its own retry (with backoff) unless closed."""
        self.loop = asyncio.get_running_loop()
        if self.closing:
            return False
        if self.gate is not None:  # the fleet's connect window: CONNECTs outstanding at once
            await self.gate.acquire()
            self._gate_held = True
        try:
            self._outcome = self.loop.create_future()
            try:
                await asyncio.wait_for(
                    self.loop.create_connection(lambda: self, self.host, self.port, ssl=self.ssl), timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self._event("failed")
                log.debug("connect to %s:%s failed: %r", self.host, self.port, exc)
                self._schedule_reconnect()
                return False
            try:
                return await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
            except asyncio.TimeoutError:
                self._event("failed")  # no CONNACK in time
                if self.transport is not None:
                    self.transport.abort()
                return False
        finally:
            self._release_gate()

    def _release_gate(self) -> None:
        if self._gate_held:
            self._gate_held = False
            self.gate.release()

    def _settle(self, accepted: bool) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(accepted)
        self._release_gate()

    def _schedule_reconnect(self) -> None:
        if self.closing or self.loop is None:
            return
        self.backoff = min(self.backoff_max, max(1.0, self.backoff * 2))
        delay = self.backoff * random.uniform(0.5, 1.0)
        self.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self.closing and self.transport is None:
            self._retry = self.loop.create_task(self.connect())

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.closing:  # closed while the TCP connect was under way
            transport.close()
            return
        self.reader = PacketReader()
        client_id, username, password = self.login()
        now = time.monotonic()
        self.connack_deadline = now + 30
        self.last_received = now
        self._write(connect_packet(client_id, username, password, self.keepalive))

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        try:
            packets = self.reader.feed(data)
            for first, body in packets:
                self._handle(first, body)
        except ProtocolError as exc:
            log.warning("protocol error from the server: %s", exc)
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc) -> None:
        was_connected = self.connected
        self.transport = None
        self.connected = False
        self.connack_deadline = None
        self._settle(False)
        if was_connected:
            self._event("disconnected")
        self._schedule_reconnect()

    # --- packets ----------------------------------------------------------------------------------
    def _handle(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            topic, payload, qos, packet_id = parse_publish(first, body)
            if qos == 1:
                self._write(puback_packet(packet_id))
            if self.on_message is not None:
                self.on_message(topic, payload)
        elif kind == PUBACK:
            if len(body) >= 2:
                self.inflight.pop(int.from_bytes(body[:2], "big"), None)
        elif kind == CONNACK:
            _, code = parse_connack(body)
            self.connack_deadline = None
            if code != 0:
                log.debug("CONNACK %s (%s)", code, CONNACK_REASONS.get(code, "?"))
                self._event("refused")
                self.backoff = max(self.backoff, self.backoff_max / 2)  # a refusal is not fixed by retrying fast
                self._settle(False)
                self.transport.close()
                return
            self.connected = True
            self.backoff = 0.0
            self._event("connected")
            for packet_id, (topic, payload) in sorted(self.inflight.items()):
                self._write(publish_packet(topic, payload, 1, packet_id, dup=True))
            if self.on_connect is not None:
                self.on_connect()
            self._settle(True)
        elif kind in (PINGRESP, SUBACK):
            pass
        else:
            raise ProtocolError(f"unexpected packet type {kind >> 4}")

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.last_sent = time.monotonic()

    def _event(self, name: str) -> None:
        if self.on_state is not None:
            self.on_state(name)

    # --- API ----------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Sent now if connected; a QoS 1 message is kept and sent again until acknowledged. A QoS 0
        message while disconnected is dropped (as the SDKs do)."""
        if qos == 1:
            self.next_packet_id = self.next_packet_id % 0xFFFF + 1
            while self.next_packet_id in self.inflight:
                self.next_packet_id = self.next_packet_id % 0xFFFF + 1
            self.inflight[self.next_packet_id] = (topic, payload)
            if self.connected:
                self._write(publish_packet(topic, payload, 1, self.next_packet_id))
        elif self.connected:
            self._write(publish_packet(topic, payload, 0))

    def tick(self, now: float) -> None:
        """Keepalive and the CONNACK deadline; call about once a second."""
        if self.transport is None:
            return
        if self.connack_deadline is not None and now > self.connack_deadline:
            self.transport.abort()
            return
        if not self.connected or not self.keepalive:
            return
        if now - self.last_received > self.keepalive * 1.5:
            self.transport.abort()  # the server went silent: connection_lost reconnects
        elif now - self.last_sent >= self.keepalive * 0.5:
            self._write(PINGREQ_PACKET)

    def close(self) -> None:
        """DISCONNECT and stop reconnecting."""
        self.closing = True
        if self.transport is not None:
            self._write(DISCONNECT_PACKET)
            self.transport.close()
        self._settle(False)
