"""S3BlobStore against a real S3-protocol server process (moto_server, see tests/support/moto.py).

moto accepts presigned POSTs without enforcing their policy conditions, so these tests check
the policy we sign, not that the server applies it; CreateOTAFirmware's own digest check covers that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from cryptography.fernet import Fernet

from otaplane.blobs.base import BlobDigest, UploadForm
from otaplane.blobs.oss_signing import OssError, SizeRange
from otaplane.blobs.post_object import Upload
from otaplane.blobs.s3 import MAX_PRESIGN_S, BlobStoreUnavailable, S3BlobStore
from otaplane.secretbox import SecretBox
from tests.support.server import free_port


@pytest.fixture(scope="module")
def store(s3_blob_url: str) -> S3BlobStore:
    return S3BlobStore.from_url(s3_blob_url)


@pytest.fixture(scope="module")
def prefixed(s3_blob_url: str) -> S3BlobStore:
    return S3BlobStore.from_url(s3_blob_url + "&prefix=tenant-a/")


def new_key(name: str = "fw.bin") -> str:
    return f"ota/{uuid.uuid4().hex}/{name}"


def post_form(form: UploadForm, content: bytes) -> httpx.Response:
    # httpx sends `data` fields before `files`, so `file` is the last part, as S3 and OSS require.
    return httpx.post(form.host, data=form.fields, files={"file": ("firmware.bin", content)}, timeout=30)


def upload(store: S3BlobStore, key: str, content: bytes) -> UploadForm:
    form = store.upload_form(key, max_bytes=len(content) + 1024, expires_in_s=60)
    response = post_form(form, content)
    assert response.status_code in (200, 201, 204), response.text
    return form


def expected_digest(content: bytes) -> BlobDigest:
    return BlobDigest(len(content), hashlib.md5(content).hexdigest(), hashlib.sha256(content).hexdigest())


def test_upload_form_carries_a_sigv4_policy_for_exactly_that_key(store: S3BlobStore) -> None:
    key = new_key()
    form = store.upload_form(key, max_bytes=5000, expires_in_s=60)
    assert form.key == key
    assert form.object_storage == "S3"
    assert form.object_url == store.object_url(key)
    assert form.host == f"{store.endpoint}/{store.bucket}"
    assert form.fields["key"] == key
    assert form.policy == form.fields["policy"]
    assert form.signature == form.fields["x-amz-signature"]
    assert form.access_key_id == "otaplane-test-key"  # from the AWS env chain, never from the URL
    policy = json.loads(base64.b64decode(form.policy))
    assert ["content-length-range", 0, 5000] in policy["conditions"]
    assert ["eq", "$key", key] in policy["conditions"]


def test_upload_then_digest_and_download(store: S3BlobStore) -> None:
    content = bytes(range(256)) * 9000  # ~2.2 MiB: several 1 MiB chunks while digesting
    key = new_key()
    form = upload(store, key, content)
    assert store.digest(key) == expected_digest(content)

    url = store.presigned_get(key, 300)
    assert httpx.get(url).content == content
    partial = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert partial.status_code == 206
    assert partial.content == content[100:200]
    assert partial.headers["content-range"] == f"bytes 100-199/{len(content)}"
    # The unsigned canonical URL is an identifier, not a download link.
    assert httpx.get(form.object_url).status_code == 403


def test_key_with_spaces_and_plus_round_trips(store: S3BlobStore) -> None:
    key = new_key("fw 1+x (v2)~.bin")
    upload(store, key, b"payload")
    assert store.object_url(key).endswith("/fw%201%2Bx%20%28v2%29~.bin")
    assert store.digest(key) == expected_digest(b"payload")
    assert httpx.get(store.presigned_get(key, 60)).content == b"payload"
    assert store.key_from_url(store.object_url(key)) == key
    assert store.key_from_url(store.presigned_get(key, 60)) == key


def test_key_from_url_accepts_our_forms_only(store: S3BlobStore) -> None:
    key = new_key()
    endpoint = urlsplit(store.endpoint)
    port = endpoint.port
    assert store.key_from_url(store.object_url(key)) == key
    assert store.key_from_url(store.presigned_get(key, 60)) == key
    assert store.key_from_url(f"http://{store.bucket}.127.0.0.1:{port}/{key}") == key  # virtual-host style
    assert store.key_from_url(f"HTTP://127.0.0.1:{port}/{store.bucket}/{key}") == key
    foreign = [
        f"http://127.0.0.1:{port}/other-bucket/{key}",
        f"http://127.0.0.1:{port + 1}/{store.bucket}/{key}",
        f"https://127.0.0.1:{port}/{store.bucket}/{key}",
        f"http://example.com:{port}/{store.bucket}/{key}",
        f"http://other.127.0.0.1:{port}/{key}",
        f"http://127.0.0.1:{port}/{store.bucket}",
        f"http://127.0.0.1:{port}/{store.bucket}/",
        f"http://127.0.0.1:{port}/{store.bucket}x/{key}",
        f"http://127.0.0.1:bad/{store.bucket}/{key}",
        "ota/relative/fw.bin",
        "",
    ]
    for url in foreign:
        assert store.key_from_url(url) is None, url


def test_prefix_is_applied_on_the_server_and_hidden_from_callers(
    store: S3BlobStore, prefixed: S3BlobStore
) -> None:
    key = new_key()
    form = upload(prefixed, key, b"tenant data")
    assert form.key == key and form.fields["key"] == "tenant-a/" + key
    assert prefixed.key_from_url(form.object_url) == key
    assert prefixed.digest(key) == expected_digest(b"tenant data")
    assert store.digest("tenant-a/" + key) == expected_digest(b"tenant data")  # really stored under it
    assert store.digest(key) is None
    # The unprefixed store's URLs are not the prefixed store's objects, and vice versa.
    assert prefixed.key_from_url(store.object_url(key)) is None
    assert store.key_from_url(form.object_url) == "tenant-a/" + key


def test_delete_is_idempotent_and_digest_of_missing_is_none(store: S3BlobStore) -> None:
    key = new_key()
    upload(store, key, b"to be deleted")
    store.delete(key)
    assert store.digest(key) is None
    store.delete(key)  # already gone: no error
    assert store.digest(new_key("never-uploaded.bin")) is None


def test_presigned_get_expiry_is_capped_at_the_sigv4_maximum(store: S3BlobStore) -> None:
    query = parse_qs(urlsplit(store.presigned_get(new_key(), 30 * 24 * 3600)).query)
    assert query["X-Amz-Expires"] == [str(MAX_PRESIGN_S)]
    assert "X-Amz-Signature" in query


def test_check_passes_on_the_live_bucket(store: S3BlobStore) -> None:
    store.check()


def test_missing_bucket_is_a_clear_error_not_a_missing_object(store: S3BlobStore) -> None:
    other = S3BlobStore.from_url(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}?endpoint_url={store.endpoint}")
    with pytest.raises(BlobStoreUnavailable, match="no-such-bucket"):
        other.digest("ota/x.bin")
    with pytest.raises(BlobStoreUnavailable):
        other.check()


def test_refused_endpoint_fails_fast_with_a_clear_error() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dead = S3BlobStore.from_url(f"s3://bucket?endpoint_url={endpoint}&region=us-east-1")
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailable, match="127.0.0.1"):
        dead.digest("ota/x.bin")
    with pytest.raises(BlobStoreUnavailable):
        dead.delete("ota/x.bin")
    assert time.monotonic() - started < 10
    # Signing needs no network: forms and URLs are still produced while the store is down.
    assert dead.upload_form("ota/x.bin", 10, 60).host == f"{endpoint}/bucket"


@pytest.fixture()
def silent_endpoint() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a hung store."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_hung_endpoint_times_out_instead_of_hanging(silent_endpoint: str) -> None:
    hung = S3BlobStore.from_url(
        f"s3://bucket?endpoint_url={silent_endpoint}&region=us-east-1", read_timeout_s=1, max_attempts=1
    )
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailable, match="timeout|timed out"):
        hung.digest("ota/x.bin")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "https://bucket/x",
        "s3://bucket?endpoint_url=http://x&access_key_id=AKID&secret_access_key=s",
        "s3://bucket?endpoint=http://x",
        "s3://AKID:s3cr3t@bucket?endpoint_url=http://x",  # was taken as a bucket named "AKID:s3cr3t@bucket"
        "s3://bucket/tenant/?endpoint_url=http://x&prefix=other/",
    ],
)
def test_from_url_rejects_bad_urls_and_secrets_in_urls(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        S3BlobStore.from_url(url)
    assert "s3cr3t" not in str(refused.value)


@pytest.mark.parametrize("url_tail, prefix", [
    ("", ""), ("/", ""), ("/tenant-b/", "tenant-b/"), ("/a/b", "a/b/"),  # the path was ignored
    ("?prefix=fw", "fw/"), ("?prefix=/fw/", "fw/"), ("/?prefix=fw", "fw/"),  # "fw" made keys "fwota/..."
])
def test_from_url_takes_the_key_prefix_from_the_path_or_prefix_as_a_folder(url_tail: str, prefix: str) -> None:
    separator = "&" if "?" in url_tail else "?"
    blob_store = S3BlobStore.from_url(f"s3://bucket{url_tail}{separator}endpoint_url=http://127.0.0.1:9&region=us-east-1")
    assert blob_store.bucket == "bucket" and blob_store.prefix == prefix


def test_factory_opens_s3_store(s3_blob_url: str, tmp_path) -> None:
    from otaplane.blobs.factory import open_blob_store
    from otaplane.settings import Settings

    box = SecretBox(Fernet.generate_key())
    blob_store = open_blob_store(Settings(blob_url=s3_blob_url, data_dir=tmp_path), box=box)
    assert isinstance(blob_store, S3BlobStore)
    assert blob_store.bucket == "otaplane-test" and blob_store.prefix == ""
    # By default otaplane receives the uploads (an OSS form posted to it, put into the bucket)...
    form = blob_store.upload_form(new_key(), 1000, 60)
    assert form.object_storage == "OSS" and form.host.endswith("/oss/otaplane")
    assert [route.path for route in blob_store.routes()][:2] == ["/oss/otaplane", "/oss/otaplane/"]
    # ...unless the URL asks for S3's presigned POST.
    direct = open_blob_store(Settings(blob_url=s3_blob_url + "&uploads=direct", data_dir=tmp_path), box=box)
    assert direct.upload_form(new_key(), 1000, 60).object_storage == "S3" and direct.routes() == []
    with pytest.raises(ValueError):
        S3BlobStore.from_url(s3_blob_url + "&uploads=sometimes")


def test_read_range(store: S3BlobStore) -> None:
    content = os.urandom(10_000)
    key = new_key()
    upload(store, key, content)
    assert store.read_range(key, 0, 5120) == content[:5120]
    assert store.read_range(key, 5120, 5120) == content[5120:]
    assert store.read_range(key, len(content), 10) == b""
    assert store.read_range(new_key("missing.bin"), 0, 10) is None


def _received(store: S3BlobStore, tmp_path, key: str, content: bytes):
    """An upload as the PostObject receiver hands it to the store (its temp file written)."""
    upload = Upload.open(tmp_path, {"key": key}, SizeRange(0, len(content)))
    anyio.run(upload.write, content)
    return upload


def test_an_upload_through_otaplane_gets_its_md5_as_etag_even_past_the_multipart_size(store, tmp_path) -> None:
    """boto3's upload_file switched to a multipart upload above 8 MB, whose ETag is not the MD5."""
    content = os.urandom(9 * 1024 * 1024)
    key = new_key()
    upload = _received(store, tmp_path, key, content)
    try:
        store._publish(upload)  # noqa: SLF001
    finally:
        upload.discard()
    head = store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["ETag"] == f'"{hashlib.md5(content).hexdigest()}"'


def test_a_key_written_by_another_replica_after_the_check_is_not_overwritten(store, tmp_path, monkeypatch) -> None:
    """Two replicas receiving one form: both pass the HEAD check, the store's condition stops the second."""
    key = new_key()
    upload(store, key, b"the first replica's bytes")
    monkeypatch.setattr(store, "exists", lambda _key: False)  # the second replica checked before the first wrote
    late = _received(store, tmp_path, key, b"the second replica's bytes")
    try:
        with pytest.raises(OssError) as refused:
            store._publish(late)  # noqa: SLF001
    finally:
        late.discard()
    assert refused.value.status == 409
    assert store.read(key, 1024) == b"the first replica's bytes"
