"""The simulator's MQTT 3.1.1 packet codec and Aliyun login, checked against the spec's bytes and
against otaplane's own device authentication (the server side)."""

from __future__ import annotations

import pytest

from otaplane.devices import auth
from otaplane.sim import mqtt


@pytest.mark.parametrize("n, encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length_round_trips_at_every_boundary(n, encoded):
    assert mqtt.encode_remaining_length(n) == encoded
    assert mqtt.decode_remaining_length(b"\x30" + encoded) == (n, 1 + len(encoded))


def test_remaining_length_limits():
    with pytest.raises(ValueError):
        mqtt.encode_remaining_length(268_435_456)
    assert mqtt.decode_remaining_length(b"\x30\x80") is None  # incomplete
    with pytest.raises(mqtt.ProtocolError):
        mqtt.decode_remaining_length(b"\x30\x80\x80\x80\x80\x01")


def test_connect_packet_bytes():
    packet = mqtt.connect_packet("cid", "user", "pw", keepalive=60)
    body = (b"\x00\x04MQTT" + b"\x04" + b"\xc2" + b"\x00\x3c"
            + b"\x00\x03cid" + b"\x00\x04user" + b"\x00\x02pw")
    assert packet == b"\x10" + bytes([len(body)]) + body
    anonymous = mqtt.connect_packet("c", None, None, keepalive=0, clean_session=False)
    assert anonymous == b"\x10\x0d\x00\x04MQTT\x04\x00\x00\x00\x00\x01c"


def test_subscribe_packet_bytes():
    # MQTT 3.1.1, 3.8: fixed header 0x82 (reserved bits 0010), packet id, filter, requested QoS.
    assert mqtt.subscribe_packet("a/#", packet_id=10) == b"\x82\x08\x00\x0a\x00\x03a/#\x01"
    assert mqtt.subscribe_packet("t", qos=0)[-1] == 0


def test_publish_packets_and_parse_round_trip():
    qos0 = mqtt.publish_packet("a/b", b"hi")
    assert qos0 == b"\x30\x07\x00\x03a/bhi"
    qos1 = mqtt.publish_packet("a/b", b"hi", qos=1, packet_id=258, dup=True)
    assert qos1 == b"\x3a\x09\x00\x03a/b\x01\x02hi"
    [(first, body)] = mqtt.PacketReader().feed(qos1)
    assert mqtt.parse_publish(first, body) == ("a/b", b"hi", 1, 258)
    [(first, body)] = mqtt.PacketReader().feed(qos0)
    assert mqtt.parse_publish(first, body) == ("a/b", b"hi", 0, None)
    with pytest.raises(ValueError):
        mqtt.publish_packet("t", b"", qos=2)


def test_a_large_publish_uses_a_multi_byte_length():
    payload = b"x" * 70_000
    packet = mqtt.publish_packet("/ota/device/upgrade/pk/dn", payload, qos=1, packet_id=7)
    [(first, body)] = mqtt.PacketReader().feed(packet)
    assert mqtt.parse_publish(first, body)[1] == payload


def test_reader_splits_a_stream_fed_byte_by_byte_and_in_bulk():
    stream = (b"\x20\x02\x00\x00" + mqtt.puback_packet(9) + mqtt.publish_packet("t", b"p" * 200, 1, 5)
              + b"\xd0\x00")
    reader = mqtt.PacketReader()
    one_by_one = [p for i in range(len(stream)) for p in reader.feed(stream[i:i + 1])]
    bulk = mqtt.PacketReader().feed(stream)
    assert one_by_one == bulk
    assert [first for first, _ in bulk] == [0x20, 0x40, 0x32, 0xD0]
    assert mqtt.parse_connack(bulk[0][1]) == (False, 0)
    assert bulk[1][1] == b"\x00\x09"
    assert reader.buffer == bytearray()


def test_parse_publish_refuses_garbage():
    with pytest.raises(mqtt.ProtocolError):
        mqtt.parse_publish(0x36, b"\x00\x01t\x00\x01")  # QoS 3
    with pytest.raises(mqtt.ProtocolError):
        mqtt.parse_publish(0x32, b"\x00\x05ab")  # topic longer than the body
    with pytest.raises(mqtt.ProtocolError):
        mqtt.parse_connack(b"\x00")


@pytest.mark.parametrize("method", ["hmacsha1", "hmacsha256", "hmacmd5"])
def test_aliyun_login_is_what_the_server_accepts(method):
    client_id, username, password = mqtt.aliyun_login("a1PK", "sim-000001", "s3cret", sign_method=method,
                                                      timestamp="1700000000000")
    assert username == "sim-000001&a1PK"
    assert client_id == f"a1PK&sim-000001|securemode=3,signmethod={method},_ss=1,timestamp=1700000000000|"
    login = auth.parse_login(client_id, username)
    assert auth.verify(login, "s3cret", password)
    assert not auth.verify(login, "other", password)


# --- the client against a scripted broker on a loopback socket -------------------------------------
def test_client_connects_acks_pings_and_reconnects_resending_unacked_publishes():
    import asyncio
    import time

    async def scenario():
        received: list[list[tuple[int, bytes]]] = []  # packets per broker-side connection
        connections: list[asyncio.StreamWriter] = []

        async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            packets: list[tuple[int, bytes]] = []
            received.append(packets)
            connections.append(writer)
            parser = mqtt.PacketReader()
            while data := await reader.read(4096):
                for first, body in parser.feed(data):
                    packets.append((first, body))
                    if first == mqtt.CONNECT:
                        writer.write(b"\x20\x02\x00\x00")
                        if len(received) == 1:  # a push at QoS 1 on the first connection
                            writer.write(mqtt.publish_packet("/ota/device/upgrade/pk/dn", b"{}", 1, 77))
                    elif first == mqtt.PINGREQ:
                        writer.write(b"\xd0\x00")

        server = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        events, messages, connects = [], [], []
        client = mqtt.MqttClient("127.0.0.1", port, lambda: mqtt.aliyun_login("pk", "dn", "s"), keepalive=30,
                                 gate=asyncio.Semaphore(1), on_connect=lambda: connects.append(1),
                                 on_message=lambda t, p: messages.append((t, p)), on_state=events.append)
        client.backoff_max = 0.2
        assert await client.connect()
        client.publish("/ota/device/inform/pk/dn", b'{"v":1}', qos=1)  # the broker never acks it
        client.publish("/ota/device/progress/pk/dn", b'{"s":0}', qos=0)
        await asyncio.sleep(0.2)
        client.tick(time.monotonic() + 16)  # half a keepalive without sending: PINGREQ
        await asyncio.sleep(0.2)
        connections[0].close()  # the broker drops the connection: the client comes back
        for _ in range(50):
            await asyncio.sleep(0.1)
            if len(connects) == 2:
                break
        await asyncio.sleep(0.2)
        client.close()
        await asyncio.sleep(0.1)  # the broker side reads the end of the stream
        server.close()
        await server.wait_closed()
        return received, events, messages, connects

    received, events, messages, connects = asyncio.run(scenario())
    assert len(connects) == 2 and events == ["connected", "disconnected", "connected", "disconnected"]
    assert messages == [("/ota/device/upgrade/pk/dn", b"{}")]
    first, second = received[0], received[1]
    kinds = [f & 0xF0 for f, _ in first]
    assert kinds[:4] == [mqtt.CONNECT, mqtt.PUBACK, mqtt.PUBLISH, mqtt.PUBLISH] and mqtt.PINGREQ in kinds
    assert first[1][1] == b"\x00\x4d"  # PUBACK of packet id 77
    # on the new connection: CONNECT, the unacknowledged QoS 1 publish again with DUP, then DISCONNECT
    assert second[0][0] == mqtt.CONNECT
    assert second[1][0] == 0x3A
    assert mqtt.parse_publish(second[1][0], second[1][1]) == ("/ota/device/inform/pk/dn", b'{"v":1}', 1, 1)
    assert second[-1][0] == mqtt.DISCONNECT
