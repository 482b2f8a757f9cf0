"""The local blob store through a real `otaplane serve`: PostObject uploads, presigned downloads."""

from __future__ import annotations

import hashlib
from http.client import HTTPConnection
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import xmltodict

from otaplane.blobs.local import ACCESS_KEY_ID, BUCKET, LocalBlobStore
from otaplane.blobs.oss_signing import build_policy, presigned_url, sign_policy
from otaplane.secretbox import SecretBox

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def secret(server) -> str:
    key = (server.data_dir / "master.key").read_bytes().strip()
    return SecretBox(key).derive("otaplane local blob signing v1")


@pytest.fixture(scope="module")
def blobs(server, secret) -> LocalBlobStore:
    """A store twin of the server's: same root, URL and signing secret."""
    return LocalBlobStore(root=server.data_dir / "blobs", public_url=server.base_url, secret=secret)


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as client:
        yield client


def new_key(suffix: str = "bin") -> str:
    return f"ota/e2e-{uuid.uuid4().hex[:8]}/{uuid.uuid4().hex}.{suffix}"


def post(
    http: httpx.Client, url: str, fields: dict[str, str], content: bytes, file_field: str = "file"
) -> httpx.Response:
    # httpx writes `data` fields before `files`, so `file` is last, as OSS requires.
    return http.post(url, data=fields, files={file_field: ("fw.bin", content, "application/octet-stream")})


def oss_error(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/xml")
    error = xmltodict.parse(response.text)["Error"]
    assert set(error) == {"Code", "Message", "RequestId", "HostId"}
    return error


def assert_nothing_stored(blobs: LocalBlobStore, key: str | None = None) -> None:
    if key is not None:
        assert not (blobs.root / key).exists()
    incoming = blobs.root / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


def upload(http: httpx.Client, blobs: LocalBlobStore, data: bytes, key: str | None = None) -> str:
    key = key or new_key()
    form = blobs.upload_form(key, max_bytes=100 * MiB, expires_in_s=60)
    response = post(http, form.host, form.fields, data)
    assert response.status_code == 204, response.text
    return key


# --- uploads -----------------------------------------------------------------------------------


def test_upload_then_get_and_head(http, blobs):
    data = os.urandom(MiB + 12345)
    key = new_key()
    form = blobs.upload_form(key, max_bytes=10 * MiB, expires_in_s=60)
    response = post(http, form.host, form.fields, data)
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert (blobs.root / key).read_bytes() == data
    assert_nothing_stored(blobs)
    digest = blobs.digest(key)
    assert (digest.size, digest.md5, digest.sha256) == (
        len(data),
        hashlib.md5(data).hexdigest(),
        hashlib.sha256(data).hexdigest(),
    )

    url = blobs.presigned_get(key, 60)
    assert blobs.key_from_url(url) == key
    got = http.get(url)
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["content-length"] == str(len(data))
    assert got.headers["accept-ranges"] == "bytes"
    assert got.headers["etag"].startswith('"')
    assert got.headers["last-modified"].endswith("GMT")

    head = http.head(url)
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-length", "etag", "last-modified", "accept-ranges"):
        assert head.headers[name] == got.headers[name]
    head_signed = presigned_url(blobs.host, BUCKET, key, ACCESS_KEY_ID, blobs._secret, int(time.time()) + 60, "HEAD")
    assert http.head(head_signed).status_code == 200
    assert http.get(head_signed).status_code == 403  # a HEAD signature does not allow GET


@pytest.mark.parametrize("status", ["200", "201", "204"])
def test_success_action_status_and_case_insensitive_fields(http, blobs, status):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    fields = {"KEY": key, "Policy": form.policy, "ossaccesskeyid": form.access_key_id, "signature": form.signature}
    response = post(http, form.host + "/", {**fields, "success_action_status": status}, b"hello", file_field="File")
    assert response.status_code == int(status), response.text
    if status == "201":
        assert xmltodict.parse(response.text)["PostResponse"]["Key"] == key
    assert (blobs.root / key).read_bytes() == b"hello"


def test_fields_after_the_file_are_ignored(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    boundary = "b0undary"
    parts = [(name, value.encode()) for name, value in form.fields.items()]
    parts += [("file", b"payload"), ("key", b"ota/evil/other.bin"), ("success_action_status", b"201")]
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        for name, value in parts
    ) + f"--{boundary}--\r\n".encode()
    response = http.post(form.host, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 204, response.text
    assert (blobs.root / key).read_bytes() == b"payload"


def test_an_upload_appears_only_when_complete(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=10 * MiB, expires_in_s=60)
    boundary = uuid.uuid4().hex
    seen_midway: list[bool] = []

    def body() -> Iterator[bytes]:
        for name, value in form.fields.items():
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'.encode()
        yield b"x" * MiB
        time.sleep(0.5)  # the server has the first MiB by now
        seen_midway.append((blobs.root / key).exists() or http.get(blobs.presigned_get(key, 60)).status_code != 404)
        yield b"y" * MiB
        yield f"\r\n--{boundary}--\r\n".encode()

    with httpx.Client(timeout=60) as client:  # a second connection: `http` checks midway
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        response = client.post(form.host, content=body(), headers=headers)
    assert response.status_code == 204, response.text
    assert seen_midway == [False]
    assert blobs.digest(key).size == 2 * MiB


def test_an_interrupted_upload_leaves_nothing(blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=10 * MiB, expires_in_s=60)
    boundary = uuid.uuid4().hex
    temp_files_midway: list[int] = []

    def body() -> Iterator[bytes]:
        for name, value in form.fields.items():
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'.encode()
        yield b"x" * MiB
        time.sleep(0.5)
        temp_files_midway.append(len(list((blobs.root / ".incoming").iterdir())))
        raise ConnectionAbortedError("the client gives up")

    with pytest.raises(ConnectionAbortedError):
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        httpx.post(form.host, content=body(), headers=headers, timeout=30)
    assert temp_files_midway == [1]  # the upload was under way...
    deadline = time.monotonic() + 10
    while list((blobs.root / ".incoming").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_stored(blobs, key)  # ...and left nothing behind


def test_a_key_is_written_once(http, blobs):
    """A form stays valid for its policy's lifetime, but what a package adopted must not change
    under it: posting it again is refused as OSS refuses with x-oss-forbid-overwrite."""
    key = new_key()
    form = blobs.upload_form(key, max_bytes=10 * MiB, expires_in_s=60)
    first = os.urandom(1000)
    assert post(http, form.host, form.fields, first).status_code == 204
    again = post(http, form.host, form.fields, b"other bytes")
    assert again.status_code == 409
    assert oss_error(again)["Code"] == "FileAlreadyExists"
    assert (blobs.root / key).read_bytes() == first
    assert_nothing_stored(blobs)


def test_of_two_uploads_racing_to_one_key_one_is_stored_whole(blobs):
    """Both pass the early check (the key is free when their files start); the link at the end
    lets exactly one in."""
    key = new_key()
    form = blobs.upload_form(key, max_bytes=10 * MiB, expires_in_s=60)
    both_started = threading.Barrier(2, timeout=30)
    results: dict[bytes, httpx.Response] = {}

    def send(fill: bytes) -> None:
        boundary = uuid.uuid4().hex

        def body() -> Iterator[bytes]:
            for name, value in form.fields.items():
                yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'.encode()
            yield fill * MiB
            time.sleep(0.3)  # the server has checked this upload's fields by now
            both_started.wait()
            yield fill * MiB
            yield f"\r\n--{boundary}--\r\n".encode()

        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        results[fill] = httpx.post(form.host, content=body(), headers=headers, timeout=60)

    threads = [threading.Thread(target=send, args=(fill,)) for fill in (b"a", b"b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(response.status_code for response in results.values())
    assert statuses == [204, 409], statuses
    winner = next(fill for fill, response in results.items() if response.status_code == 204)
    assert (blobs.root / key).read_bytes() == winner * (2 * MiB)
    assert_nothing_stored(blobs)


def test_with_cors_origins_a_web_console_uploads_and_downloads_but_the_api_stays_without(make_server):
    """`--cors-origins` (OTAPLANE_CORS_ORIGINS) opens the blob endpoints, and only them, to a
    browser on another origin, as an OSS bucket's CORS rule does (the rule itself: unit/test_blob_cors.py)."""
    console = "https://console.example.com"
    server = make_server("sqlite", "--rate-limit", "0", "--cors-origins", console)
    secret = SecretBox((server.data_dir / "master.key").read_bytes().strip()).derive("otaplane local blob signing v1")
    store = LocalBlobStore(root=server.data_dir / "blobs", public_url=server.base_url, secret=secret)
    key, data = new_key(), os.urandom(5000)
    form = store.upload_form(key, max_bytes=MiB, expires_in_s=60)
    asked = {"Origin": console, "Access-Control-Request-Method": "POST"}
    with httpx.Client(timeout=60, headers={"Origin": console}) as browser:
        allowed = browser.options(form.host, headers=asked)
        assert (allowed.status_code, allowed.headers["access-control-allow-origin"]) == (200, console)
        posted = post(browser, form.host, form.fields, data)
        assert (posted.status_code, posted.headers["access-control-allow-origin"]) == (204, console)
        got = browser.get(store.presigned_get(key, 60))
        assert (got.content, got.headers["access-control-allow-origin"]) == (data, console)
        assert "etag" in got.headers["access-control-expose-headers"].lower()
        refused = browser.options(form.host, headers={**asked, "Origin": "https://elsewhere.example.com"})
        assert (refused.status_code, oss_error(refused)["Code"]) == (403, "AccessForbidden")
        for api in (browser.options(server.base_url + "/", headers=asked), browser.post(server.base_url + "/")):
            assert not [name for name in api.headers if name.startswith("access-control-")], api.headers


# --- upload refusals ---------------------------------------------------------------------------


def signed_fields(secret: str, key: str, policy: str) -> dict[str, str]:
    return {"key": key, "policy": policy, "OSSAccessKeyId": ACCESS_KEY_ID, "Signature": sign_policy(secret, policy)}


def in_ms(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


def test_expired_policy(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=-1)
    response = post(http, form.host, form.fields, b"data")
    assert response.status_code == 403
    error = oss_error(response)
    assert (error["Code"], error["Message"]) == ("AccessDenied", "Invalid according to Policy: Policy expired.")
    assert_nothing_stored(blobs, key)


def test_wrong_signature(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    other = LocalBlobStore(blobs.root, blobs.public_url, "another secret").upload_form(key, 2000, 60)
    for fields in (
        {**form.fields, "Signature": other.signature},
        {**form.fields, "policy": other.policy},  # a policy that is not the signed one
        {**form.fields, "Signature": ""},
    ):
        response = post(http, form.host, fields, b"data")
        expected = (400, "InvalidArgument") if not fields["Signature"] else (403, "SignatureDoesNotMatch")
        assert (response.status_code, oss_error(response)["Code"]) == expected
    response = post(http, form.host, {**form.fields, "OSSAccessKeyId": "LTAIsomeoneelse"}, b"data")
    assert (response.status_code, oss_error(response)["Code"]) == (403, "InvalidAccessKeyId")
    assert_nothing_stored(blobs, key)


def test_key_not_allowed_by_policy(http, blobs):
    key, other_key = new_key(), new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    response = post(http, form.host, {**form.fields, "key": other_key}, b"data")
    assert response.status_code == 403
    error = oss_error(response)
    assert error["Code"] == "AccessDenied"
    assert error["Message"] == f'Invalid according to Policy: Policy Condition failed: ["eq", "$key", "{key}"]'
    assert_nothing_stored(blobs, key)
    assert_nothing_stored(blobs, other_key)


def test_invalid_key_even_when_signed(http, blobs, secret):
    for key in ("ota/../../master.key", "../escape.bin", "/abs.bin", ".incoming/x.part", "ota\\x.bin"):
        policy = build_policy(key, 1000, in_ms(60))
        response = post(http, blobs.host, signed_fields(secret, key, policy), b"data")
        assert (response.status_code, oss_error(response)["Code"]) == (400, "InvalidObjectName"), key
    assert not (blobs.root.parent / "escape.bin").exists()
    assert_nothing_stored(blobs)


@pytest.mark.parametrize("size", [1001, 3 * MiB])
def test_too_big(http, blobs, size):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    response = post(http, form.host, form.fields, b"z" * size)
    assert response.status_code == 400
    assert oss_error(response)["Code"] == "EntityTooLarge"
    assert_nothing_stored(blobs, key)
    # Exactly the limit is fine.
    assert post(http, form.host, form.fields, b"z" * 1000).status_code == 204


def test_too_small(http, blobs, secret):
    key = new_key()
    fields = signed_fields(secret, key, build_policy(key, 1000, in_ms(60), min_bytes=10))
    response = post(http, blobs.host, fields, b"123456789")
    assert response.status_code == 400
    assert oss_error(response)["Code"] == "EntityTooSmall"
    assert_nothing_stored(blobs, key)
    assert post(http, blobs.host, fields, b"1234567890").status_code == 204


def test_missing_fields_and_missing_file(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    for name in form.fields:
        fields = {k: v for k, v in form.fields.items() if k != name}
        response = post(http, form.host, fields, b"data")
        assert (response.status_code, oss_error(response)["Code"]) == (400, "InvalidArgument"), name
    response = http.post(form.host, data=form.fields, files={"notfile": ("a", b"data")})
    assert (response.status_code, oss_error(response)["Code"]) == (400, "InvalidArgument")
    assert_nothing_stored(blobs, key)


def test_malformed_requests(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    good = post(http, form.host, form.fields, b"data").request.read()
    boundary = good.split(b"\r\n", 1)[0][2:].decode()
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    cases = [
        (good[: len(good) // 2 + 40], multipart),  # cut short inside the file part... or earlier
        (good[:-60], multipart),  # cut before the closing boundary
        (b"garbage", multipart),
        (good, {"content-type": "multipart/form-data"}),  # no boundary
        (b"key=a&policy=b", {"content-type": "application/x-www-form-urlencoded"}),
        (good, {}),
    ]
    (blobs.root / key).unlink()
    for body, headers in cases:
        response = http.post(form.host, content=body, headers=headers)
        assert response.status_code == 400, (body[:80], response.text)
        assert oss_error(response)["Code"] in ("MalformedPOSTRequest", "InvalidArgument")
        assert_nothing_stored(blobs, key)


def test_oversized_fields(http, blobs):
    key = new_key()
    form = blobs.upload_form(key, max_bytes=1000, expires_in_s=60)
    response = post(http, form.host, {"padding": "p" * 70_000, **form.fields}, b"data")
    assert (response.status_code, oss_error(response)["Code"]) == (400, "MaxPOSTPreDataLengthExceeded")
    assert_nothing_stored(blobs, key)


# --- downloads ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(http, blobs) -> tuple[str, bytes]:
    data = os.urandom(700_000)
    return upload(http, blobs, data), data


def test_single_ranges(http, blobs, stored):
    key, data = stored
    url = blobs.presigned_get(key, 60)
    size = len(data)
    for header, start, end in (
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, size - 1),
        ("bytes=-500", size - 500, size - 1),
        (f"bytes=100-{size + 1000}", 100, size - 1),
    ):
        response = http.get(url, headers={"Range": header})
        assert response.status_code == 206, header
        assert response.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert response.headers["content-length"] == str(end - start + 1)
        assert response.content == data[start : end + 1]
    past_the_end = http.get(url, headers={"Range": f"bytes={size}-"})  # a finished download, resumed
    assert past_the_end.status_code == 416
    assert past_the_end.headers["content-range"] == f"bytes */{size}"
    assert oss_error(past_the_end)["Code"] == "InvalidRange"


def test_if_range_decides_whether_a_range_past_the_end_is_refused(http, blobs, stored):
    """If-Range that matches: the Range counts, and past the end it is OSS's XML InvalidRange
    (not FileResponse's plain 416); If-Range that does not match: the whole object, 200."""
    key, data = stored
    url = blobs.presigned_get(key, 60)
    etag = http.head(url).headers["etag"]
    size = len(data)
    matching = http.get(url, headers={"Range": f"bytes={size}-", "If-Range": etag})
    assert matching.status_code == 416
    assert matching.headers["content-range"] == f"bytes */{size}"
    assert oss_error(matching)["Code"] == "InvalidRange"
    changed = http.get(url, headers={"Range": f"bytes={size}-", "If-Range": '"another-version"'})
    assert changed.status_code == 200
    assert changed.content == data
    ranged = http.get(url, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert ranged.status_code == 206
    assert ranged.content == data[10:20]


def test_other_methods_get_oss_xml_405(http, blobs, server, stored):
    key, data = stored
    url = blobs.presigned_get(key, 60)
    bucket = f"{server.base_url}/oss/otaplane"
    cases = [("PUT", url, "GET, HEAD"), ("DELETE", url, "GET, HEAD"), ("POST", url, "GET, HEAD"),
             ("OPTIONS", url, "GET, HEAD"), ("GET", bucket, "POST"), ("PUT", bucket + "/", "POST")]
    for method, target, allowed in cases:
        response = http.request(method, target, content=b"x")
        assert response.status_code == 405, (method, target)
        assert oss_error(response)["Code"] == "MethodNotAllowed"
        assert response.headers["allow"] == allowed
    assert http.get(url).content == data  # nothing changed


def test_conditional_downloads_answer_304_and_412_as_oss_does(http, blobs, stored):
    """OSS GetObject's four conditions (they were ignored: always 200/206). A device resuming
    with If-Match learns that the object changed instead of splicing two versions."""
    key, data = stored
    url = blobs.presigned_get(key, 60)
    head = http.head(url)
    etag, modified = head.headers["etag"], head.headers["last-modified"]
    before, after = "Thu, 01 Jan 1970 00:00:00 GMT", "Fri, 01 Jan 2100 00:00:00 GMT"

    for headers in ({"If-None-Match": etag}, {"If-None-Match": f'"x", W/{etag}'}, {"If-None-Match": "*"},
                    {"If-Modified-Since": modified}, {"If-Modified-Since": after}):
        for method in (http.get, http.head):
            response = method(url, headers=headers)
            assert response.status_code == 304, (headers, method)
            assert response.content == b""
            assert response.headers["etag"] == etag and response.headers["last-modified"] == modified
    for headers in ({"If-Match": '"another-version"'}, {"If-Match": f"W/{etag}"},
                    {"If-Unmodified-Since": before}, {"If-Match": '"x"', "Range": "bytes=0-9"}):
        response = http.get(url, headers=headers)
        assert response.status_code == 412, headers
        assert oss_error(response)["Code"] == "PreconditionFailed"
    for headers in ({"If-Match": etag}, {"If-Match": f'"x", {etag}'}, {"If-Match": "*"},
                    {"If-None-Match": '"another-version"'}, {"If-Modified-Since": before},
                    {"If-Unmodified-Since": modified}, {"If-Unmodified-Since": after},
                    {"If-Modified-Since": "not a date"}, {"If-Unmodified-Since": "not a date"},
                    # an ETag condition outweighs its date counterpart (RFC 9110 13.2.2)
                    {"If-Match": etag, "If-Unmodified-Since": before},
                    {"If-None-Match": '"another-version"', "If-Modified-Since": after}):
        response = http.get(url, headers=headers)
        assert response.status_code == 200, headers
        assert response.content == data
    resumed = http.get(url, headers={"If-Match": etag, "Range": "bytes=10-19"})
    assert resumed.status_code == 206 and resumed.content == data[10:20]


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest().upper()}"'


def size_and_time_etag(path: Path) -> str:
    """The ETag of an object stored before MD5 ETags (Starlette FileResponse's)."""
    st = path.stat()
    return f'"{hashlib.md5(f"{st.st_mtime}-{st.st_size}".encode()).hexdigest()}"'


def test_an_uploaded_objects_etag_is_its_md5_as_on_oss(http, blobs, stored):
    """On OSS a PostObject upload's ETag is the content's MD5 in uppercase hex, and devices and
    tools compare it with the package's MD5 (ours came from size and time). Every answer says
    it and every condition weighs it: streamed and small objects, HEAD, 304, 412, 206, If-Range."""
    small = os.urandom(1000)
    for key, data in (stored, (upload(http, blobs, small), small)):
        url = blobs.presigned_get(key, 60)
        etag = md5_etag(data)
        assert http.get(url).headers["etag"] == etag
        assert http.head(url).headers["etag"] == etag
        not_modified = http.get(url, headers={"If-None-Match": etag})
        assert (not_modified.status_code, not_modified.headers["etag"]) == (304, etag)
        resumed = http.get(url, headers={"If-Match": etag, "Range": "bytes=10-19"})
        assert (resumed.status_code, resumed.content, resumed.headers["etag"]) == (206, data[10:20], etag)
        assert http.get(url, headers={"If-Range": etag, "Range": "bytes=10-19"}).status_code == 206
        older = size_and_time_etag(blobs.root / key)
        assert http.get(url, headers={"If-Match": older}).status_code == 412
        assert http.get(url, headers={"If-Range": older, "Range": "bytes=10-19"}).status_code == 200


def test_an_object_stored_before_md5_etags_keeps_its_etag(http, blobs):
    """No MD5 kept for it (stored by an older otaplane): the size-and-time ETag, as before."""
    key, data = new_key(), os.urandom(5000)
    path = blobs.root / key
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    url = blobs.presigned_get(key, 60)
    etag = size_and_time_etag(path)
    assert http.get(url).headers["etag"] == etag
    assert http.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert http.get(url, headers={"If-Match": md5_etag(data)}).status_code == 412


@pytest.mark.parametrize("header", ["", "bytes", "bytes=", "items=0-9", "bytes=9-2", "bytes=a-b", "\u00e9"])
def test_a_range_that_cannot_be_parsed_is_ignored(http, blobs, stored, header):
    """As OSS and S3 do (and RFC 9110 allows): the whole object, not an error."""
    key, data = stored
    response = http.get(blobs.presigned_get(key, 60), headers={"Range": header.encode()})
    assert response.status_code == 200
    assert response.content == data


def test_resume_an_interrupted_download_several_times(http, blobs, stored):
    key, data = stored
    url = blobs.presigned_get(key, 60)
    received = bytearray()
    for _ in range(3):  # read a little, drop the connection, resume from where we are
        headers = {"Range": f"bytes={len(received)}-"} if received else {}
        with httpx.Client(timeout=30) as client, client.stream("GET", url, headers=headers) as response:
            assert response.status_code == (206 if received else 200)
            for chunk in response.iter_bytes(50_000):
                received += chunk
                break
    response = http.get(url, headers={"Range": f"bytes={len(received)}-"})
    assert response.status_code == 206
    received += response.content
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


def test_multiple_ranges(http, blobs, stored):
    key, data = stored
    response = http.get(blobs.presigned_get(key, 60), headers={"Range": "bytes=0-9,100-199,-5"})
    assert response.status_code == 206
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/byteranges; boundary=")
    boundary = content_type.split("boundary=")[1].encode()
    bodies = []
    for part in response.content.split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        assert b"Content-Range: bytes" in head
        bodies.append(body.removesuffix(b"\r\n"))
    assert bodies == [data[0:10], data[100:200], data[-5:]]


def test_download_refusals(http, blobs, stored):
    key, _ = stored
    url = blobs.presigned_get(key, 60)
    parts = urlsplit(url)
    other = upload(http, blobs, b"other object")
    forged = [
        url.replace(parts.path, urlsplit(blobs.object_url(other)).path),  # another object
        url.replace("Expires=", "Expires=1"),  # a longer life
        url.replace("Signature=", "Signature=A"),
    ]
    for bad in forged:
        response = http.get(bad)
        assert response.status_code == 403, bad
        assert oss_error(response)["Code"] == "SignatureDoesNotMatch"
        assert http.head(bad).status_code == 403
    response = http.get(url.replace("OSSAccessKeyId=otaplane-local", "OSSAccessKeyId=LTAIother"))
    assert (response.status_code, oss_error(response)["Code"]) == (403, "InvalidAccessKeyId")

    expired = blobs.presigned_get(key, -1)
    response = http.get(expired)
    assert response.status_code == 403
    assert (oss_error(response)["Code"], oss_error(response)["Message"]) == ("AccessDenied", "Request has expired.")
    assert http.head(expired).status_code == 403

    for unsigned in (blobs.object_url(key), url.split("&Signature=")[0]):
        response = http.get(unsigned)
        assert (response.status_code, oss_error(response)["Code"]) == (403, "AccessDenied")

    missing = blobs.presigned_get(new_key(), 60)
    response = http.get(missing)
    assert (response.status_code, oss_error(response)["Code"]) == (404, "NoSuchKey")
    assert http.head(missing).status_code == 404
    folder = blobs.presigned_get(key.rsplit("/", 1)[0], 60)
    assert http.get(folder).status_code == 404


def raw_get(server, path: str) -> tuple[int, bytes]:
    """http.client sends the path as given: no dot-segment cleanup like httpx does."""
    connection = HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_path_traversal_never_leaves_the_root(server, blobs, secret):
    master_key = (server.data_dir / "master.key").read_bytes().strip()
    (blobs.root / ".incoming").mkdir(parents=True, exist_ok=True)
    (blobs.root / ".incoming" / "half.part").write_bytes(b"half an upload")
    try:
        attempts = {
            "/oss/otaplane/../../master.key": "../../master.key",
            "/oss/otaplane/../master.key": "../master.key",
            "/oss/otaplane/%2e%2e/%2e%2e/master.key": "../../master.key",
            "/oss/otaplane/%2E%2E%2F%2E%2E%2Fmaster.key": "../../master.key",
            "/oss/otaplane/..%2f..%2fmaster.key": "../../master.key",
            "/oss/otaplane/ota/..%5c..%5c..%5cmaster.key": "ota/..\\..\\..\\master.key",
            "/oss/otaplane/%2f" + str(server.data_dir / "master.key").lstrip("/"): str(server.data_dir / "master.key"),
            "/oss/otaplane//" + str(server.data_dir / "master.key").lstrip("/"): str(server.data_dir / "master.key"),
            "/oss/otaplane/.incoming/half.part": ".incoming/half.part",
            "/oss/otaplane/ota/%00/../../master.key": "ota/\x00/../../master.key",
        }
        for path, key in attempts.items():
            # Unsigned, and signed with the real secret over the decoded key: both refused.
            query = urlsplit(presigned_url("http://x", BUCKET, key, ACCESS_KEY_ID, secret, int(time.time()) + 60)).query
            for target in (path, f"{path}?{query}"):
                status, body = raw_get(server, target)
                assert status in (400, 403, 404), (target, status)
                assert master_key not in body and b"half an upload" not in body, target
    finally:
        (blobs.root / ".incoming" / "half.part").unlink()


# --- memory --------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_300_mb_upload_and_download_stream_through_bounded_memory(server, blobs):
    if not Path(f"/proc/{server.process.pid}/status").exists():
        pytest.skip("needs /proc")
    size = 300 * MiB
    key = new_key()
    form = blobs.upload_form(key, max_bytes=size, expires_in_s=120)
    boundary = uuid.uuid4().hex
    block = os.urandom(MiB)
    md5 = hashlib.md5()

    def body() -> Iterator[bytes]:
        for name, value in form.fields.items():
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'.encode()
        for i in range(size // MiB):
            chunk = i.to_bytes(8, "big") + block[8:]  # every MiB differs
            md5.update(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    pid = server.process.pid
    baseline = rss_bytes(pid)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with httpx.Client(timeout=120) as client:
            headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
            response = client.post(form.host, content=body(), headers=headers)
            assert response.status_code == 204, response.text
            download = hashlib.md5()
            with client.stream("GET", blobs.presigned_get(key, 60)) as got:
                assert got.headers["content-length"] == str(size)
                for chunk in got.iter_bytes():
                    download.update(chunk)
    finally:
        done.set()
        sampler.join()
    try:
        assert download.hexdigest() == md5.hexdigest()
        assert blobs.digest(key).md5 == md5.hexdigest()
        assert peak - baseline < 100 * MiB, f"server RSS grew by {(peak - baseline) / MiB:.0f} MiB"
    finally:
        blobs.delete(key)
