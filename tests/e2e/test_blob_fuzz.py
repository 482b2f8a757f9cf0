"""The local blob store's own HTTP endpoints, fed generated uploads and downloads: never a 5xx.

Uploads: the form of a real GenerateOTAUploadURL answer with fields left out, swapped for hostile
text or added, and a file part that may be missing, empty or too big. Downloads: a real presigned
URL with its query parameters tampered with and Range headers of every shape. What must hold: a
status under 500; every refusal an OSS-style XML error with a Code; no object stored by a refused
upload; a 200 or 206 download holding exactly the bytes asked for; no traceback in the log.
Examples and seed: tests/support/fuzzing.py.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.clients import RawSigner
from tests.support.fuzzing import EXAMPLES, assert_clean_log, fuzzing
from tests.support.uploads import form_fields

CONTENT = os.urandom(3000)
HOSTILE = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "../x", "/etc/passwd", "\x00", "a" * 5000, "%2e%2e/", "ota/../../x", "-1",
                     "99999999999999999999", "bytes=", "bytes=-0", "bytes=5-2", "bytes=0-0,0-0,0-0",
                     "bytes=" + ",".join(["0-1"] * 200), "bytes=2999-", "bytes=3000-", "bytes=-5000",
                     # digits str.isdigit() passes and int() refuses (an Expires of these was a 500)
                     "\u00b2", "9" * 4301]),
)


def _no_controls(text: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


@pytest.fixture(scope="module")
def signer(make_server) -> RawSigner:
    server = make_server("sqlite", "--rate-limit", "0")
    signer = RawSigner(server.base_url, *server.create_key("blob-fuzz"))
    signer.server = server
    return signer


def new_upload(signer: RawSigner) -> dict:
    body = signer.v1("GenerateOTAUploadURL", {}).json()
    assert body["Success"], body
    return body["Data"]


def assert_oss_error(response: httpx.Response, where: str) -> None:
    assert response.status_code < 500, f"{where}: HTTP {response.status_code} {response.text[:300]}"
    if response.status_code >= 400 and response.request.method != "HEAD":
        assert response.headers.get("content-type", "").startswith("application/xml"), f"{where}: {response.text[:300]}"
        code = ET.fromstring(response.content).findtext("Code")
        assert code, f"{where}: {response.text[:300]}"


def test_generated_uploads_are_answered_and_refused_ones_store_nothing(signer):
    blobs = signer.server.data_dir / "blobs"  # the local store's files (blobs/factory.py)
    @fuzzing(EXAMPLES * 3)
    @given(
        dropped=st.sets(st.sampled_from(["key", "policy", "OSSAccessKeyId", "Signature", "success_action_status"])),
        replaced=st.dictionaries(st.sampled_from(["key", "policy", "OSSAccessKeyId", "Signature",
                                                  "success_action_status", "Content-Type", "x-oss-meta-a"]),
                                 HOSTILE, max_size=2),
        content=st.sampled_from([None, b"", CONTENT, b"x" * 70_000]),
    )
    def one_upload(dropped, replaced, content):
        data = new_upload(signer)
        fields = {k: v for k, v in form_fields(data).items() if k not in dropped}
        fields.update(replaced)
        files = None if content is None else {"file": ("f.bin", content, "application/octet-stream")}
        try:
            response = httpx.post(data["Host"], data=fields, files=files, timeout=30)
        except httpx.InvalidURL:  # httpx itself refuses some field values: nothing was sent
            return
        where = f"upload {sorted(dropped)} {replaced!r:.300} {None if content is None else len(content)}"
        assert_oss_error(response, where)
        stored = blobs / data["Key"]
        if response.status_code in (200, 201, 204):
            assert stored.read_bytes() == content, where
        else:
            assert not stored.exists(), where  # a refused upload left no object behind

    one_upload()
    incoming = blobs / ".incoming"
    assert not incoming.exists() or not any(incoming.iterdir()), list(incoming.iterdir())  # no half-written files
    assert_clean_log(signer.server)


def test_generated_downloads_are_answered_with_the_right_bytes(signer):
    data = new_upload(signer)
    uploaded = httpx.post(data["Host"], data=form_fields(data), files={"file": ("f.bin", CONTENT)})
    assert uploaded.status_code in (200, 204), uploaded.text
    product = signer.v1("CreateProduct", {"ProductName": "blob_fuzz", "NodeType": "0"}).json()["ProductKey"]
    created = signer.v1("CreateOTAFirmware", {"ProductKey": product, "FirmwareName": "blob-fuzz", "DestVersion": "1.0",
                                              "FirmwareUrl": data["FirmwareUrl"]}).json()
    firmware = signer.v1("QueryOTAFirmware", {"FirmwareId": created["Data"]["FirmwareId"]}).json()["FirmwareInfo"]
    url = urlsplit(firmware["FirmwareUrl"])  # presigned: Expires, OSSAccessKeyId, Signature
    real = dict(parse_qsl(url.query))
    base = f"{url.scheme}://{url.netloc}{url.path}"

    @fuzzing(EXAMPLES * 3)
    @given(
        query=st.dictionaries(st.sampled_from(["Expires", "OSSAccessKeyId", "Signature", "x"]), HOSTILE, max_size=2),
        dropped=st.sets(st.sampled_from(sorted(real))),
        # No control characters: a header holding one is not HTTP, and uvicorn refuses the
        # message itself (a plain 400) before any application sees it.
        range_header=st.one_of(st.none(), HOSTILE.filter(_no_controls),
                               st.tuples(st.integers(0, 3100), st.integers(0, 3100)).map(
                                   lambda r: f"bytes={r[0]}-{r[1]}")),
        method=st.sampled_from(["GET", "HEAD"]),
    )
    def one_download(query, dropped, range_header, method):
        params = {k: v for k, v in real.items() if k not in dropped}
        params.update(query)
        headers = {} if range_header is None else {"Range": range_header.encode()}
        try:
            response = httpx.request(method, f"{base}?{urlencode(params)}", headers=headers, timeout=30)
        except (httpx.InvalidURL, httpx.LocalProtocolError):  # refused by httpx before sending
            return
        where = f"{method} {params!r:.300} Range={range_header!r:.80}"
        assert_oss_error(response, where)
        if method == "GET" and response.status_code == 200:
            assert response.content == CONTENT, where
        if method == "GET" and response.status_code == 206 and "multipart" not in response.headers["content-type"]:
            first, last = response.headers["content-range"].split()[1].split("/")[0].split("-")
            assert response.content == CONTENT[int(first):int(last) + 1], where

    one_download()
    assert_clean_log(signer.server)
