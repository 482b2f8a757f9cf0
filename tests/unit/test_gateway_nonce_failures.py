"""When the nonce file cannot record a nonce, signed requests get a 503 ServiceUnavailable in
the POP error shape: never a 500, never a request let through without its replay check."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
from urllib.parse import urlencode

import pytest
from starlette.testclient import TestClient

from otaplane.server import create_app, prepare
from otaplane.services.container import Services
from otaplane.settings import Settings
from otaplane.store import nonce_file
from tests.support.clients import RawSigner

PAGE = {"CurrentPage": "1", "PageSize": "10"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _running(tmp_path):
    """(services, in-process test client, signer) of an app on the embedded defaults."""
    services = Services.build(Settings(data_dir=tmp_path, host="127.0.0.1", mqtt_port=_free_port(), rate_limit=0))
    prepare(services)
    key = json.loads((tmp_path / "admin-credentials.json").read_text())
    signer = RawSigner("", key["AccessKeyId"], key["AccessKeySecret"])
    try:
        with TestClient(create_app(services)) as client:
            yield services, client, signer
    finally:
        gc.unfreeze()  # the app's startup froze this test process's objects


@pytest.fixture()
def running(tmp_path):
    with _running(tmp_path) as parts:
        yield parts


def _query(client: TestClient, signer: RawSigner):
    return client.get("/?" + urlencode(signer.v1_params("QueryProductList", PAGE, method="GET")))


def _assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["Code"] == "ServiceUnavailable"
    assert body["RequestId"] and body["Message"]


def test_a_full_nonce_file_answers_503(tmp_path, monkeypatch):
    monkeypatch.setattr(nonce_file, "MAP_SIZE", 64 * 1024)
    with _running(tmp_path) as (_services, client, signer):  # after the patch: the file opens small
        first_url = "/?" + urlencode(signer.v1_params("QueryProductList", PAGE, method="GET"))
        assert client.get(first_url).json()["Success"] is True
        answered = 1
        for _ in range(5_000):
            response = _query(client, signer)
            if response.status_code != 200:
                break
            assert response.json()["Success"] is True
            answered += 1
        assert answered > 50  # it worked until the file filled up
        _assert_unavailable(response)
        # A full B-tree can still take a nonce whose leaf has room, so later requests may pass;
        # what must hold is that each one is either answered or refused with 503, never a 500...
        for _ in range(20):
            response = _query(client, signer)
            if response.status_code != 200:
                _assert_unavailable(response)
        # ...and that the nonces already recorded survived: a replay is still refused.
        replayed = client.get(first_url)
        assert replayed.status_code == 400, replayed.text
        assert replayed.json()["Code"] == "SignatureNonceUsed"


def test_a_failing_nonce_file_answers_503(running):
    services, client, signer = running
    assert _query(client, signer).json()["Success"] is True
    services.nonces._env.close()  # what any other LMDB error looks like to the request path
    _assert_unavailable(_query(client, signer))
