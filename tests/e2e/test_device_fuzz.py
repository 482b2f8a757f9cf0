"""A device sending generated messages on every upstream OTA topic: it stays connected, is still
answered, and the server logs no error.

A device is untrusted input. The payloads are JSON shaped like the real messages (`id`,
`params` with `version`, `module`, `step`, `desc`, `fileToken`, `fileInfo`, `fileBlock`) whose
values are drawn from every JSON type (huge and negative numbers, floats, NUL and other scripts in
strings, nested objects), plus bytes that are not JSON at all. The device has a package pushed to
it (a real upgrade task), so reports and block requests reach the services, not only the parsers.
After each batch the device asks firmware/get with a sentinel id and must get its answer: the
messages before it were all handled (one connection's messages are handled in order).
Examples and seed: tests/support/fuzzing.py.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.clients import SdkCaller
from tests.support.devices import connect, device_password, raw_connect
from tests.support.fuzzing import EXAMPLES as BASE_EXAMPLES
from tests.support.fuzzing import assert_clean_log, fuzzing
from tests.support.uploads import post_upload

EXAMPLES = BASE_EXAMPLES * 5

SCALARS = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=80),
    st.integers(), st.sampled_from([-1, 0, 1, 100, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.sampled_from(["-1", "-2", "-3", "-4", "50", "100", "101", " 7 ", "\u0661", "1e3", "", "\x00", "v" * 200]),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                    max_leaves=6)
FIELDS = ["version", "module", "step", "desc", "fileToken", "fileInfo", "fileBlock", "method"]
PARAMS = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(
        JSON,
        st.fixed_dictionaries({}, optional={"streamId": JSON, "fileId": JSON, "size": JSON, "offset": JSON}),
    ), max_size=5),
)
PAYLOAD = st.one_of(
    st.fixed_dictionaries({}, optional={"id": JSON, "params": PARAMS, "code": JSON}).map(
        lambda body: json.dumps(body).encode()),
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def device(make_server):
    server = make_server("sqlite", "--rate-limit", "0")
    api = SdkCaller("tea-v3", server.endpoint, *server.create_key("device-fuzz"))
    product_key = api.call("CreateProduct", {"ProductName": "device_fuzz", "NodeType": 0})["ProductKey"]
    secret = api.call("RegisterDevice", {"ProductKey": product_key, "DeviceName": "fuzzer"})["Data"]["DeviceSecret"]
    upload = api.call("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
    assert post_upload(upload, os.urandom(20_000)).status_code in (200, 204)
    firmware_id = api.call("CreateOTAFirmware", {"ProductKey": product_key, "FirmwareName": "fuzz-fw",
                                                 "DestVersion": "2.0.0", "FirmwareUrl": upload["FirmwareUrl"],
                                                 "NeedToVerify": False})["Data"]["FirmwareId"]
    device = connect(server.mqtt_port, product_key, "fuzzer", secret)
    device.inform("1.0.0")
    job = api.call("CreateOTAStaticUpgradeJob", {"FirmwareId": firmware_id, "ProductKey": product_key,
                                                 "TargetSelection": "SPECIFIC", "TargetDeviceName": ["fuzzer"]})
    assert job["Success"], job
    device.expect(device.upgrade_topic, timeout=30)  # a real task is in flight: reports reach it
    device.server, device.secret = server, secret
    yield device
    device.close()


def test_generated_device_messages_leave_the_device_connected_and_answered(device):
    pk, dn = device.product_key, device.device_name
    topics = [f"/ota/device/inform/{pk}/{dn}", f"/ota/device/progress/{pk}/{dn}",
              f"/sys/{pk}/{dn}/thing/ota/firmware/get", f"/sys/{pk}/{dn}/thing/file/download",
              f"/ota/device/request/{pk}/{dn}"]
    sent = {"count": 0}

    @fuzzing(EXAMPLES)
    @given(st.lists(st.tuples(st.sampled_from(topics), PAYLOAD), min_size=1, max_size=5))
    def one_batch(messages):
        for topic, payload in messages:
            device.publish(topic, payload)
            sent["count"] += 1
        sentinel = f"sentinel-{sent['count']}"
        device.firmware_get(request_id=sentinel)
        while True:  # replies to generated firmware/get messages may come first
            reply = device.expect(device.get_reply_topic, timeout=15).json()
            if reply.get("id") == sentinel:
                break
        assert not device.disconnected.is_set()

    one_batch()
    assert sent["count"] >= EXAMPLES
    assert_clean_log(device.server)


def test_generated_connects_let_in_only_the_right_password(device):
    """CONNECT with generated client ids (the SDKs' `id|securemode=..,signmethod=..,timestamp=..|`
    grammar with odd values), user names and passwords: every one is answered with a CONNACK or a
    closed connection, and none is let in without the device's real password."""
    server, pk, dn = device.server, device.product_key, device.device_name
    secret = device.secret
    text = st.text(max_size=20)
    client_ids = st.builds(
        lambda head, fields: head + ("|" + ",".join(f"{k}={v}" for k, v in fields.items()) + "|" if fields else ""),
        st.one_of(st.just(dn), text),
        st.dictionaries(st.sampled_from(["securemode", "signmethod", "timestamp", "ext", "_ss"]),
                        st.one_of(st.sampled_from(["2", "3", "-1", "hmacsha1", "hmacmd5", "hmacsha256", "HMACSHA1",
                                                   "sha1", "", "1700000000000"]), text), max_size=3),
    )
    methods = st.sampled_from(["hmacsha1", "hmacmd5", "hmacsha256"])
    answered = {"accepted": 0, "refused": 0}

    @fuzzing(EXAMPLES)
    @given(client_id=client_ids, user=st.one_of(st.just(f"{dn}&{pk}"), text.map(lambda t: f"{t}&{pk}"), text),
           real_password=st.booleans(), method=methods, garbage=text)
    def one_connect(client_id, user, real_password, method, garbage):
        password = device_password(secret, client_id.split("|")[0], dn, pk, None, method) if real_password else garbage
        try:
            sock, connack = raw_connect(server.mqtt_port, client_id, user, password, 30)
        except (ConnectionError, OSError):
            return  # closed at once: refused
        with sock:
            if not connack:
                return  # closed without CONNACK: refused
            assert connack[:2] == b"\x20\x02", connack
            if connack[3] == 0:  # let in: only with the real device's real password
                assert user == f"{dn}&{pk}" and real_password, (client_id, user, password)
            answered["accepted" if connack[3] == 0 else "refused"] += 1

    one_connect()
    assert answered["accepted"] and answered["refused"], answered  # both sides of the check were seen
    assert_clean_log(server)
