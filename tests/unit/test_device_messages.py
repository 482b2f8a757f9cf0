"""OTA payloads: lenient parsing of what devices send, and exactly what otaplane sends them."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from otaplane.devices import messages
from otaplane.devices.messages import MalformedMessage
from otaplane.services.device_ota import PackageFile, PendingPackage

MD5 = "93230c3bde425a9d7984a594ac55ea1e"
SHA256 = "5" * 64

PACKAGE = PendingPackage(
    device_id=1, product_key="a1PK", device_name="dev1", module_name="default", module_is_default=True,
    message_id=1507707025, firmware_id="fw1", version="2.0.0", size=432945, sign_method="Md5", sign=MD5,
    md5=MD5, url="http://127.0.0.1:8080/blobs/x.bin?Expires=1&Signature=s", files=(), is_diff=False, udi=None,
    progress=None, progress_desc=None, delivered=False,
)


def test_push_of_a_full_md5_package_in_the_default_module():
    body = json.loads(messages.upgrade_push(PACKAGE))
    assert body == {
        "code": "1000", "message": "success", "id": 1507707025,
        "data": {"size": 432945, "version": "2.0.0", "url": PACKAGE.url, "md5": MD5, "sign": MD5,
                 "signMethod": "Md5"},
    }


def test_push_of_a_sha256_diff_package_in_a_module_with_udi():
    package = replace(PACKAGE, module_name="MCU", module_is_default=False, sign_method="SHA256",
                      sign=SHA256.upper(), md5=MD5.upper(), is_diff=True, udi='{"ota":"x"}')
    data = json.loads(messages.upgrade_push(package))["data"]
    assert data["signMethod"] == "SHA256"
    assert data["sign"] == SHA256 and data["md5"] == MD5  # lowercase hex, md5 always there
    assert data["module"] == "MCU"
    assert data["isDiff"] == 1
    assert data["extData"] == {"_package_udi": '{"ota":"x"}'}
    assert isinstance(data["size"], int)


def test_multi_file_package():
    files = (PackageFile("a.bin", 10, "http://h/a", "aa" * 16, "aa" * 16),
             PackageFile("b.bin", 20, "http://h/b", "BB" * 16, "bb" * 16))
    package = replace(PACKAGE, files=files, url=None, sign=None, md5=None, size=30)
    data = json.loads(messages.upgrade_push(package))["data"]
    assert data["files"] == [
        {"fileName": "a.bin", "fileSize": 10, "fileUrl": "http://h/a", "fileSign": "aa" * 16},
        {"fileName": "b.bin", "fileSize": 20, "fileUrl": "http://h/b", "fileSign": "bb" * 16},
    ]
    assert data["size"] == 30 and "url" not in data and "sign" not in data


def test_push_of_a_package_downloaded_over_mqtt():
    data = json.loads(messages.upgrade_push(replace(PACKAGE, mqtt_stream=1397345)))["data"]
    assert data == {"size": 432945, "version": "2.0.0", "dProtocol": "mqtt", "streamId": 1397345,
                    "streamFileId": 1, "md5": MD5, "sign": MD5, "signMethod": "Md5"}


def test_parse_block_request_as_lsdk4_writes_it():
    payload = (b'{"id":"1","version":"1.0","params":{"fileToken":"default","fileInfo":{"streamId":1397345,'
               b'"fileId":1,},"fileBlock":{"size":5120,"offset":0}}}')  # the SDK's trailing comma
    assert messages.parse_block_request(payload) == messages.BlockRequest("1", "default", 1397345, 1, 0, 5120)


@pytest.mark.parametrize("params", [
    {}, {"fileInfo": {"streamId": 1, "fileId": 1}}, {"fileInfo": [], "fileBlock": {}},
    {"fileInfo": {"streamId": "x", "fileId": 1}, "fileBlock": {"size": 1, "offset": 0}},
    {"fileInfo": {"streamId": 1, "fileId": 1}, "fileBlock": {"size": 0, "offset": 0}},
    {"fileInfo": {"streamId": 1, "fileId": 1}, "fileBlock": {"size": 1, "offset": -1}},
    {"fileInfo": {"streamId": True, "fileId": 1}, "fileBlock": {"size": 1, "offset": 0}},
    {"fileToken": 5, "fileInfo": {"streamId": 1, "fileId": 1}, "fileBlock": {"size": 1, "offset": 0}},
])
def test_parse_block_request_refuses_garbage(params):
    with pytest.raises(MalformedMessage):
        messages.parse_block_request(json.dumps({"id": 1, "params": params}).encode())


def test_crc16_arc_agrees_with_the_table_driven_one():
    rng = random.Random(4)
    for size in (0, 1, 2, 9, 255, 5120, 131072):
        data = rng.randbytes(size)
        assert messages.crc16_arc(data) == messages.crc16_arc_python(data), size
    assert messages.crc16_arc_python(b"123456789") == 0xBB3D


def test_crc16_arc_and_the_block_reply_layout():
    assert messages.crc16_arc(b"123456789") == 0xBB3D  # CRC-16/ARC's check value
    assert messages.crc16_arc(b"") == 0
    reply = messages.block_reply({"code": 200, "data": {"bSize": 3}}, b"abc")
    length = int.from_bytes(reply[:2], "big")
    assert json.loads(reply[2:2 + length]) == {"code": 200, "data": {"bSize": 3}}
    assert reply[2 + length:-2] == b"abc"
    assert reply[-2:] == messages.crc16_arc(b"abc").to_bytes(2, "little")


def test_firmware_get_reply_echoes_the_id_as_sent():
    assert json.loads(messages.firmware_get_reply("123", None)) == {
        "id": "123", "code": 200, "data": {}, "message": "success", "method": "thing.ota.firmware.get"}
    reply = json.loads(messages.firmware_get_reply(5, PACKAGE))
    assert reply["id"] == 5 and reply["code"] == 200 and reply["data"]["version"] == "2.0.0"


@pytest.mark.parametrize("payload, module, request_id", [
    (b'{"id": 1, "params": {"version": "1.0.0", "module": "MCU"}}', "MCU", 1),
    (b'{"id":"123","params":{"version":"1.0.0"}}', None, "123"),
    (b'{"id": 1,"params": {"version":"1.0.0","module": "default"}}', "default", 1),
    (b'{"id":1,"params":{"version":"1.0.0","module":"",},}', None, 1),  # trailing commas
])
def test_parse_inform(payload, module, request_id):
    report = messages.parse_inform(payload)
    assert (report.version, report.module, report.request_id) == ("1.0.0", module, request_id)


@pytest.mark.parametrize("payload", [
    b"not json", b"[1,2]", b'{"id": 1}', b'{"id": 1, "params": {"version": ""}}',
    b'{"id": 1, "params": {"version": 1}}', b'{"id": [1], "params": {"version": "1"}}',
    b'{"id": 1, "params": "x"}', b"\xff\xfe", ('{"params": {"version": "%s"}}' % ("9" * 65)).encode(),
    b'{"params": {"version": "1\\u0000"}}', b'{"params": {"version": "1", "module": 5}}',
    # module names outside CreateOTAModule's rule: 1-64 of [A-Za-z0-9._-]
    ('{"params": {"version": "1", "module": "%s"}}' % ("m" * 65)).encode(),
    b'{"params": {"version": "1", "module": "MCU v2"}}', b'{"params": {"version": "1", "module": "\\u6a21"}}',
    b'{"params": {"version": "1", "module": "a/b"}}',
])
def test_malformed_informs(payload):
    with pytest.raises(MalformedMessage):
        messages.parse_inform(payload)


def test_oversize_payloads_are_refused():
    with pytest.raises(MalformedMessage):
        messages.loads_lenient(b"{" + b" " * messages.MAX_PAYLOAD_BYTES + b"}")


@pytest.mark.parametrize("payload, step, desc", [
    (b'{"id": "1", "params": {"step": "-1", "desc": "failed", "module": "MCU"}}', -1, "failed"),
    (b'{"id": 1, "params": {"step": 50}}', 50, None),
    (b'{"id": 1, "params": {"step": "100", "desc": ""}}', 100, None),
    (b'{"id": 1, "params": {"step": "0", "desc": "",}}', 0, None),
    (b'{"id": 1, "params": {"step": "-4"}}', -4, None),
])
def test_parse_progress(payload, step, desc):
    report = messages.parse_progress(payload)
    assert (report.step, report.desc) == (step, desc)


@pytest.mark.parametrize("payload", [
    b'{"params": {"step": "101"}}', b'{"params": {"step": "-5"}}', b'{"params": {"step": "x"}}',
    b'{"params": {"step": true}}', b'{"params": {}}', b'{"params": {"step": 1.5}}',
    b'{"params": {"step": "1", "desc": 5}}',
])
def test_malformed_progress(payload):
    with pytest.raises(MalformedMessage):
        messages.parse_progress(payload)


def test_long_descriptions_are_cut():
    payload = json.dumps({"params": {"step": "-2", "desc": "x" * 1000}}).encode()
    assert len(messages.parse_progress(payload).desc) == messages.MAX_DESC_LENGTH


def test_parse_firmware_get():
    assert messages.parse_firmware_get(b'{"id":7,"params":{}}') == messages.FirmwareQuery(7, None)
    query = messages.parse_firmware_get(
        b'{"id": "123", "version": "1.0", "params": {"module": "MCU"}, "method": "thing.ota.firmware.get"}')
    assert query == messages.FirmwareQuery("123", "MCU")
    assert messages.parse_firmware_get(b'{"id": 1}') == messages.FirmwareQuery(1, None)


def test_parse_legacy_request_as_iotkit_writes_it():
    assert messages.parse_legacy_request(b'{"id":3,"params":{"version":"1.0.0"}}') == messages.FirmwareQuery(3, None)
    assert messages.parse_legacy_request(b'{"id":"4","params":{"version":"1.0.0","module":"MCU"}}') == \
        messages.FirmwareQuery("4", "MCU")
    with pytest.raises(MalformedMessage):
        messages.parse_legacy_request(b'{"id":3,"params":"1.0.0"}')


def test_answers_on_the_request_topic_are_not_requests():
    # The answer travels on the topic the request came on: otaplane sees its own answers there.
    assert messages.parse_legacy_request(messages.legacy_request_reply(3, None)) is None
    assert messages.parse_legacy_request(messages.legacy_request_reply(3, PACKAGE)) is None


def test_legacy_request_reply():
    assert json.loads(messages.legacy_request_reply(3, None)) == {
        "code": "1000", "data": {}, "id": 3, "message": "success"}
    # With a package: the push itself, which iotkit handles once it finds `url` in it.
    assert messages.legacy_request_reply(3, PACKAGE) == messages.upgrade_push(PACKAGE)


def test_a_block_the_store_cannot_read_now_is_refused_with_503(caplog):
    """S3 unreachable during an MQTT download: a header-only refusal the device can act on (ask
    again), and a warning; it was an exception logged with a traceback and no reply at all."""
    from otaplane.blobs.base import BlobStoreUnavailable
    from otaplane.devices.upstream import _block_reply

    class StoreDown:  # stands in for DeviceOtaService: only its file_block is called
        def file_block(self, *args):
            raise BlobStoreUnavailable("S3 GetObject on bucket 'b' at http://s3 failed: timed out")

    request = messages.parse_block_request(json.dumps({
        "id": 1, "params": {"fileToken": "t1", "fileInfo": {"streamId": 7, "fileId": 0},
                            "fileBlock": {"size": 1024, "offset": 0}}}).encode())
    reply = _block_reply(StoreDown(), 3, request)
    length = int.from_bytes(reply[:2], "big")
    header = json.loads(reply[2:2 + length])
    assert header["code"] == 503 and header["data"] == {"fileToken": "t1"}
    assert reply[2 + length:-2] == b""
    assert "not read" in caplog.text


def test_a_payload_nested_thousands_deep_is_malformed_not_a_crash():
    """json.loads raises RecursionError (not a ValueError) on it: each such message was logged
    as a failure with a traceback (found by an audit)."""
    payload = b'{"id": 1, "params": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert len(payload) < messages.MAX_PAYLOAD_BYTES
    with pytest.raises(messages.MalformedMessage, match="nested too deep"):
        messages.parse_inform(payload)
