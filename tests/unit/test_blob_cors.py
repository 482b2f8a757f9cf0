"""CORS on the blob endpoints (blobs.cors): a web console on another origin posting
GenerateOTAUploadURL's form and downloading, answered as an OSS bucket's CORS rule answers."""

from __future__ import annotations

import os

import pytest
import xmltodict
from cryptography.fernet import Fernet
from starlette.applications import Starlette
from starlette.testclient import TestClient

from otaplane.blobs.cors import parse_origins
from otaplane.blobs.factory import open_blob_store
from otaplane.blobs.local import LocalBlobStore
from otaplane.secretbox import SecretBox
from otaplane.settings import Settings

CONSOLE = "https://console.example.com"
KEY = "ota/iot-1a2b3c4d/fw.bin"


def client_of(tmp_path, origins: str) -> tuple[TestClient, LocalBlobStore]:
    store = LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:19080", "secret", cors_origins=parse_origins(origins))
    return TestClient(Starlette(routes=store.routes()), base_url="http://127.0.0.1:19080"), store


def upload(client: TestClient, store: LocalBlobStore, data: bytes, origin: str | None = None):
    form = store.upload_form(KEY, max_bytes=len(data), expires_in_s=60)
    headers = {"Origin": origin} if origin else {}
    return client.post(form.host, data=form.fields, files={"file": ("fw.bin", data)}, headers=headers)


def preflight(client: TestClient, url: str, method: str, origin: str = CONSOLE, headers: str | None = None):
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return client.options(url, headers=asked)


def vary(response) -> set[str]:
    return {name.strip().lower() for name in response.headers.get("vary", "").split(",")}


def test_preflights_of_an_allowed_origin_are_answered(tmp_path):
    client, store = client_of(tmp_path, f"{CONSOLE}, https://other.example.com")
    bucket = store.upload_form(KEY, 100, 60).host
    for url, method in ((bucket, "POST"), (store.presigned_get(KEY, 60), "GET"), (bucket + "/" + KEY, "HEAD")):
        response = preflight(client, url, method, headers="x-requested-with, content-type")
        assert response.status_code == 200, (url, response.text)
        assert response.headers["access-control-allow-origin"] == CONSOLE
        assert response.headers["access-control-allow-methods"] == "GET, HEAD, POST"
        assert response.headers["access-control-allow-headers"] == "x-requested-with, content-type"
        assert "origin" in vary(response)
        assert response.headers["x-oss-request-id"]


@pytest.mark.parametrize("origin, method", [("https://evil.example.com", "POST"), (CONSOLE, "PUT"),
                                            (CONSOLE, "DELETE"), ("http://console.example.com", "GET")])
def test_a_preflight_not_allowed_gets_osss_403(tmp_path, origin, method):
    client, store = client_of(tmp_path, CONSOLE)
    response = preflight(client, store.upload_form(KEY, 100, 60).host, method, origin)
    assert response.status_code == 403
    error = xmltodict.parse(response.text)["Error"]
    assert error["Code"] == "AccessForbidden" and error["Message"].startswith("CORSResponse:")
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-methods" not in response.headers


def test_uploads_and_downloads_say_the_allowed_origin_and_expose_etag(tmp_path):
    client, store = client_of(tmp_path, CONSOLE)
    data = os.urandom(1000)
    posted = upload(client, store, data, CONSOLE)
    assert posted.status_code == 204, posted.text
    assert posted.headers["access-control-allow-origin"] == CONSOLE
    url = store.presigned_get(KEY, 60)
    for response in (client.get(url, headers={"Origin": CONSOLE}), client.head(url, headers={"Origin": CONSOLE}),
                     client.get(url, headers={"Origin": CONSOLE, "Range": "bytes=0-9"})):
        assert response.status_code in (200, 206)
        assert response.headers["access-control-allow-origin"] == CONSOLE
        exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
        assert exposed == {"etag", "content-length", "x-oss-request-id"}
        assert "origin" in vary(response)
    etag = client.head(url).headers["etag"]
    not_modified = client.get(url, headers={"Origin": CONSOLE, "If-None-Match": etag})
    assert (not_modified.status_code, not_modified.headers["access-control-allow-origin"]) == (304, CONSOLE)
    refused = client.get(url + "0", headers={"Origin": CONSOLE})  # a bad signature: the error is readable too
    assert (refused.status_code, refused.headers["access-control-allow-origin"]) == (403, CONSOLE)
    other = client.get(url, headers={"Origin": "https://evil.example.com"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_any_origin_is_echoed_and_a_star_in_an_origin_matches_subdomains(tmp_path):
    client, store = client_of(tmp_path, "*")
    url = store.presigned_get(KEY, 60)
    for origin in (CONSOLE, "http://localhost:3000"):
        response = preflight(client, url, "GET", origin)
        assert (response.status_code, response.headers["access-control-allow-origin"]) == (200, origin)
    client, store = client_of(tmp_path, "https://*.example.com")
    assert preflight(client, url, "GET", CONSOLE).status_code == 200
    assert preflight(client, url, "GET", "https://example.org").status_code == 403


def test_forms_received_for_s3_follow_the_rule_too(s3_blob_url, tmp_path):
    settings = Settings(blob_url=s3_blob_url, data_dir=tmp_path, cors_origins=CONSOLE)
    store = open_blob_store(settings, SecretBox(Fernet.generate_key()))
    client = TestClient(Starlette(routes=store.routes()))
    response = preflight(client, store.upload_form(KEY, 100, 60).host, "POST")
    assert (response.status_code, response.headers["access-control-allow-origin"]) == (200, CONSOLE)


def test_without_origins_no_cors_as_before(tmp_path):
    client, store = client_of(tmp_path, "")
    assert upload(client, store, b"firmware", CONSOLE).status_code == 204
    url = store.presigned_get(KEY, 60)
    response = client.get(url, headers={"Origin": CONSOLE})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]
    refused = preflight(client, url, "GET")
    assert refused.status_code == 405  # OSS's XML MethodNotAllowed, as for any OPTIONS
    assert xmltodict.parse(refused.text)["Error"]["Code"] == "MethodNotAllowed"


def test_origins_setting(monkeypatch):
    monkeypatch.setenv("OTAPLANE_CORS_ORIGINS", " https://Console.example.com/ ,http://10.0.0.5:8080,")
    assert parse_origins(Settings().cors_origins) == ("https://console.example.com", "http://10.0.0.5:8080")
    assert parse_origins("") == () and parse_origins("*") == ("*",)
    for wrong in ("console.example.com", "https://console.example.com/app", "ftp://x"):
        with pytest.raises(ValueError):
            parse_origins(wrong)
