"""A device on the MQTT channel, as the SDKs connect it (paho-mqtt 2, MQTT 3.1.1), for tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from otaplane.sim import mqtt as mqtt_codec

SIGN = {"hmacmd5": hashlib.md5, "hmacsha1": hashlib.sha1, "hmacsha256": hashlib.sha256}


def device_password(secret: str, client_id: str, device_name: str, product_key: str,
                    timestamp: str | None, method: str = "hmacsha1", upper: bool = False) -> str:
    content = f"clientId{client_id}deviceName{device_name}productKey{product_key}"
    if timestamp is not None:
        content += f"timestamp{timestamp}"
    digest = hmac.new(secret.encode(), content.encode(), SIGN[method]).hexdigest()
    return digest.upper() if upper else digest


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int

    def json(self) -> dict:
        return json.loads(self.payload)


@dataclass
class Device:
    """A connected device: `publish`, `expect(topic)`; closed by `close()`."""

    product_key: str
    device_name: str
    client: mqtt.Client
    inbox: "queue.Queue[Received]" = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)
    subacks: "queue.Queue[list]" = field(default_factory=queue.Queue)

    @property
    def upgrade_topic(self) -> str:
        return f"/ota/device/upgrade/{self.product_key}/{self.device_name}"

    @property
    def get_reply_topic(self) -> str:
        return f"/sys/{self.product_key}/{self.device_name}/thing/ota/firmware/get_reply"

    def publish(self, topic: str, payload: bytes | str | dict, qos: int = 1) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos)
        if qos:
            info.wait_for_publish(10)
            assert info.is_published(), f"publish on {topic} was not acknowledged"

    def subscribe(self, topic_filter: str, qos: int = 1) -> list:
        """SUBSCRIBE and return the reason codes of the SUBACK."""
        self.client.subscribe(topic_filter, qos)
        return self.subacks.get(timeout=10)

    def inform(self, version: str, module: str | None = None, request_id: int | str = 1) -> None:
        params = {"version": version, **({"module": module} if module else {})}
        self.publish(f"/ota/device/inform/{self.product_key}/{self.device_name}", {"id": request_id, "params": params})

    def progress(self, step: int | str, desc: str = "", module: str | None = None) -> None:
        params = {"step": str(step), "desc": desc, **({"module": module} if module else {})}
        self.publish(f"/ota/device/progress/{self.product_key}/{self.device_name}", {"id": "1", "params": params})

    def firmware_get(self, request_id: int | str = "7", module: str | None = None) -> None:
        params = {"module": module} if module else {}
        self.publish(f"/sys/{self.product_key}/{self.device_name}/thing/ota/firmware/get",
                     {"id": request_id, "params": params}, qos=0)

    def expect(self, topic: str, timeout: float = 10) -> Received:
        """The next message on `topic` (others are kept for later)."""
        deadline = time.monotonic() + timeout
        skipped = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"nothing on {topic} within {timeout} s")
                try:
                    message = self.inbox.get(timeout=remaining)
                except queue.Empty:
                    raise AssertionError(f"nothing on {topic} within {timeout} s") from None
                if message.topic == topic:
                    return message
                skipped.append(message)
        finally:
            for message in skipped:
                self.inbox.put(message)

    def expect_nothing(self, topic: str, within: float = 1.5) -> None:
        try:
            message = self.expect(topic, within)
        except AssertionError:
            return
        raise AssertionError(f"unexpected message on {topic}: {message.payload!r}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ConnectRefused(Exception):
    def __init__(self, reason_code):
        super().__init__(f"CONNECT refused: {reason_code}")
        self.reason_code = reason_code


def connect(port: int, product_key: str, device_name: str, secret: str, *, form: str = "pylk",
            method: str = "hmacsha1", password: str | None = None, keepalive: int = 60,
            host: str = "127.0.0.1", tls: bool = False, timeout: float = 10) -> Device:
    """Connect like an SDK: `form` picks the clientId shape (pylk, lsdk4, iotkit3, plain)."""
    timestamp: str | None = str(int(time.time()))
    if form == "pylk":
        bare = f"{product_key}&{device_name}"
        client_id = (f"{bare}|securemode=3,signmethod={method},ext=1,_ss=1,lan=Python,_v=1.2.13,"
                     f"timestamp={timestamp}|")
    elif form == "lsdk4":
        bare, timestamp = f"{product_key}.{device_name}", "2524608000000"
        client_id = f"{bare}|timestamp={timestamp},_ss=1,_v=sdk-c-4.1.0,securemode=2,signmethod={method},ext=3,|"
    elif form == "iotkit3":
        bare, timestamp = f"{product_key}.{device_name}", "2524608000000"
        client_id = (f"{bare}|timestamp={timestamp},_v=sdk-c-3.2.0,securemode=3,signmethod={method},lan=C,"
                     "_ss=1,gw=0,ext=0|")
    else:  # no timestamp at all
        bare, timestamp = f"dev-{uuid.uuid4().hex[:8]}", None
        client_id = f"{bare}|securemode=3,signmethod={method}|"
    if password is None:
        password = device_password(secret, bare, device_name, product_key, timestamp, method,
                                   upper=form in ("lsdk4", "iotkit3"))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(f"{device_name}&{product_key}", password)
    if tls:
        import ssl

        client.tls_set(cert_reqs=ssl.CERT_NONE)
        client.tls_insecure_set(True)
    device = Device(product_key, device_name, client)
    outcome: "queue.Queue[object]" = queue.Queue()

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        outcome.put(reason_code)

    def on_message(_client, _userdata, message):
        device.inbox.put(Received(message.topic, message.payload, message.qos))

    def on_disconnect(_client, _userdata, _flags, _reason_code, _properties):
        device.disconnected.set()

    def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
        device.subacks.put(list(reason_codes))

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.connect(host, port, keepalive)
    client.loop_start()
    try:
        reason = outcome.get(timeout=timeout)
    except queue.Empty:
        client.loop_stop()
        raise TimeoutError("no CONNACK") from None
    if reason.is_failure:
        client.disconnect()
        client.loop_stop()
        raise ConnectRefused(reason)
    return device


def raw_connect(port: int, client_id: str, username: str, password: str, keepalive: int) -> tuple[socket.socket, bytes]:
    """A bare socket that sends one CONNECT (clean session) and then nothing: (socket, CONNACK)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(mqtt_codec.connect_packet(client_id, username, password, keepalive))
    return sock, sock.recv(4)
