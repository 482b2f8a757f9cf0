"""The S3 store going away under a running server: requests that need it are answered 503
ServiceUnavailable (not a 500 with a traceback), a package deletion stands, and an object that
could not be deleted stays recorded for the collector to try again. A moto server of this test's
own is stopped and started again on the same port (empty, as a store that lost the object)."""

from __future__ import annotations

import boto3
import httpx
import pytest

from tests.support.clients import RawSigner
from tests.support.moto import BUCKET, REGION, MotoServer
from tests.support.uploads import post_upload


@pytest.fixture
def store(moto_server, tmp_path):  # moto_server: the fake AWS credentials in the environment
    store = MotoServer(tmp_path / "moto.log").start()
    boto3.client("s3", endpoint_url=store.endpoint_url, region_name=REGION).create_bucket(Bucket=BUCKET)
    yield store
    store.stop()


def test_requests_that_need_a_store_gone_away_get_503_and_deletions_stand(make_server, store):
    blob_url = f"s3://{BUCKET}?endpoint_url={store.endpoint_url}&region={REGION}"
    server = make_server("sqlite", "--rate-limit", "0", env={"OTAPLANE_BLOB_URL": blob_url})
    signer = RawSigner(server.base_url, *server.create_key("s3-outage"))
    product_key = signer.v1("CreateProduct", {"ProductName": "outage", "NodeType": "0"}).json()["ProductKey"]
    form = signer.v1("GenerateOTAUploadURL", {}).json()["Data"]
    assert post_upload(form, b"firmware" * 100).status_code in (200, 204)
    package = {"ProductKey": product_key, "DestVersion": "1.0", "FirmwareUrl": form["FirmwareUrl"]}
    created = signer.v1("CreateOTAFirmware", {**package, "FirmwareName": "before"}).json()
    assert created["Success"], created

    late_form = signer.v1("GenerateOTAUploadURL", {}).json()["Data"]  # signed without the store
    store.stop()
    posted = post_upload(late_form, b"firmware" * 100)  # otaplane receives it, the bucket cannot
    assert posted.status_code == 503 and "<Code>ServiceUnavailable</Code>" in posted.text
    refused = signer.v1("CreateOTAFirmware", {**package, "FirmwareName": "during"})
    assert refused.status_code == 503 and refused.json()["Code"] == "ServiceUnavailable"
    deleted = signer.v1("DeleteOTAFirmware", {"FirmwareId": created["Data"]["FirmwareId"]}).json()
    assert deleted["Success"], deleted  # the package is gone; its object is left for later
    assert signer.v1("QueryOTAFirmware", {"FirmwareId": created["Data"]["FirmwareId"]}).json()["Code"] == \
        "iot.ota.FirmwareNotFound"

    store.start(port=store.port)  # back, but empty: the object is gone all the same
    boto3.client("s3", endpoint_url=store.endpoint_url, region_name=REGION).create_bucket(Bucket=BUCKET)
    # The upload is still recorded (the collector will try its deletion again): the URL is still
    # this instance's upload, whose object is missing, not an unknown URL.
    again = signer.v1("CreateOTAFirmware", {**package, "FirmwareName": "after"}).json()
    assert again["Code"] == "iot.ota.FirmwareFileNotFound", again
    log = server.logs()
    assert "Traceback" not in log, log[-3000:]
    assert "left for the next collection" in log
    assert httpx.get(f"{server.base_url}/healthz", timeout=10).status_code == 200


def test_serve_with_a_store_it_cannot_use_says_so_in_one_line(store, tmp_path):
    """A missing bucket (or a blob URL with credentials in it) stops `otaplane serve` with one
    line, not a traceback of a hundred."""
    from tests.support.server import free_port, otaplane_cli

    urls = {
        f"s3://no-such-bucket?endpoint_url={store.endpoint_url}&region={REGION}": "no-such-bucket",
        f"s3://AKID:s3cr3t@{BUCKET}?endpoint_url={store.endpoint_url}": "must not carry credentials",
    }
    for blob_url, said in urls.items():
        result = otaplane_cli("serve", "--port", str(free_port()), "--mqtt-port", str(free_port()),
                              env={"OTAPLANE_DATA_DIR": str(tmp_path), "OTAPLANE_BLOB_URL": blob_url}, check=False)
        output = " ".join((result.stdout + result.stderr).split())  # Rich wraps lines
        assert result.returncode == 1, output
        assert "otaplane cannot start" in output and said in output
        assert "Traceback" not in output and "s3cr3t" not in output
