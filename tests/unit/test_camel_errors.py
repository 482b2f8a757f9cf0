"""`--response-case camel`: every JSON answer of the RPC endpoint in lower-camel keys, errors of
the gateway (Missing<Name>, signature, the HTTP parser's 400) as much as business errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
from urllib.parse import urlencode

import pytest
from starlette.testclient import TestClient
from uvicorn.config import Config
from uvicorn.server import ServerState

from otaplane import errors
from otaplane.http_protocol import CoalescingHttpToolsProtocol
from otaplane.openapi import envelope
from otaplane.server import create_app, prepare
from otaplane.services.container import Services
from otaplane.settings import Settings
from tests.support.clients import RawSigner
from tests.unit.test_http_protocol import APP, RecordingTransport

GATEWAY_KEYS = ["RequestId", "HostId", "Code", "Message", "Recommend"]
CAMEL_GATEWAY_KEYS = ["requestId", "hostId", "code", "message", "recommend"]


def _body(reply: envelope.Reply) -> dict:
    return json.loads(reply.body)


def test_gateway_error_follows_the_case():
    error = errors.missing("FirmwareId")
    pascal = _body(envelope.failure("QueryOTAFirmware", "rid", error, "JSON", False, "h"))
    camel = _body(envelope.failure("QueryOTAFirmware", "rid", error, "JSON", True, "h"))
    assert list(pascal) == GATEWAY_KEYS
    assert list(camel) == CAMEL_GATEWAY_KEYS
    assert (camel["code"], camel["message"]) == ("MissingFirmwareId", "FirmwareId is mandatory for this action.")


def test_business_error_follows_the_case():
    camel = _body(envelope.failure("QueryOTAFirmware", "rid", errors.FirmwareNotFound(), "JSON", True, "h"))
    assert camel == {"requestId": "rid", "success": False, "code": "iot.ota.FirmwareNotFound",
                     "errorMessage": "The specified firmware does not exist."}


async def _unparsable(protocol_class) -> tuple[bytes, dict]:
    protocol = protocol_class(Config(APP, log_level="warning"), ServerState(), {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    await asyncio.sleep(0.05)
    response = b"".join(b"".join(send) for send in transport.sends)
    head, _, body = response.partition(b"\r\n\r\n")
    return head, json.loads(body)


@pytest.mark.anyio
async def test_the_http_parsers_400_follows_the_case():
    head, body = await _unparsable(CoalescingHttpToolsProtocol.for_case("pascal"))
    assert head.startswith(b"HTTP/1.1 400 ") and list(body) == GATEWAY_KEYS
    head, body = await _unparsable(CoalescingHttpToolsProtocol.for_case("camel"))
    assert head.startswith(b"HTTP/1.1 400 ") and list(body) == CAMEL_GATEWAY_KEYS
    assert body["code"] == "InvalidParameter"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _camel_app(tmp_path):
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", mqtt_port=_free_port(), rate_limit=0,
                        response_case="camel")
    services = Services.build(settings)
    prepare(services)
    key = json.loads((tmp_path / "admin-credentials.json").read_text())
    signer = RawSigner("", key["AccessKeyId"], key["AccessKeySecret"])
    try:
        with TestClient(create_app(services)) as client:
            yield client, signer
    finally:
        gc.unfreeze()  # the app's startup froze this test process's objects


def test_gateway_errors_of_a_camel_server(tmp_path):
    with _camel_app(tmp_path) as (client, signer):
        missing = client.get("/?" + urlencode(signer.v1_params("QueryOTAFirmware", {}, method="GET")))
        assert missing.status_code == 400 and missing.json()["code"] == "MissingFirmwareId"
        assert list(missing.json()) == CAMEL_GATEWAY_KEYS
        params = signer.v1_params("QueryOTAFirmware", {"FirmwareId": "fw"}, method="GET")
        forged = client.get("/?" + urlencode({**params, "Signature": "AAAA"}))
        assert forged.status_code == 400 and forged.json()["code"] == "SignatureDoesNotMatch"
        assert list(forged.json()) == CAMEL_GATEWAY_KEYS
        unsigned = client.get("/")
        assert unsigned.status_code == 400 and list(unsigned.json()) == CAMEL_GATEWAY_KEYS
        business = client.get("/?" + urlencode(signer.v1_params("QueryOTAFirmware", {"FirmwareId": "fw"},
                                                                method="GET")))
        assert business.json()["code"] == "iot.ota.FirmwareNotFound"
