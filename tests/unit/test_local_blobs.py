"""LocalBlobStore without HTTP: forms, URLs, keys, digest and delete."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from otaplane.blobs import BlobStore
from otaplane.blobs.local import ACCESS_KEY_ID, BUCKET, LocalBlobStore, is_valid_key
from otaplane.blobs.oss_signing import OssError, sign_policy, verify_post, verify_presigned
from otaplane.timefmt import parse_utc_seconds
from tests.support.uploads import store_as_received

SECRET = "unit-secret"
PUBLIC = "https://ota.example.com:8443"
KEY = "ota/iot-1a2b3c4d/Ab3dE6gH9.bin"


@pytest.fixture
def store(tmp_path) -> LocalBlobStore:
    return LocalBlobStore(root=tmp_path / "blobs", public_url=PUBLIC + "/", secret=SECRET)


def test_is_a_blob_store(store):
    blob_store: BlobStore = store  # the protocol, checked by type checkers
    assert blob_store.object_url(KEY) == f"{PUBLIC}/oss/otaplane/{KEY}"


def test_upload_form(store):
    before = time.time()
    form = store.upload_form(KEY, max_bytes=1048576000, expires_in_s=60)
    assert form.key == KEY
    assert form.host == f"{PUBLIC}/oss/otaplane"
    assert form.object_url == form.host + "/" + KEY
    assert form.object_storage == "OSS"
    assert form.access_key_id == ACCESS_KEY_ID
    assert form.signature == sign_policy(SECRET, form.policy)
    assert form.fields == {
        "key": KEY,
        "policy": form.policy,
        "OSSAccessKeyId": ACCESS_KEY_ID,
        "Signature": form.signature,
    }
    document = json.loads(base64.b64decode(form.policy))
    assert document["conditions"] == [["content-length-range", 0, 1048576000], ["eq", "$key", KEY]]
    expires_at = parse_utc_seconds(document["expiration"])
    assert before + 59 <= expires_at <= time.time() + 61
    lowered = {name.lower(): value for name, value in form.fields.items()}
    sizes = verify_post(SECRET, lowered, time.time(), BUCKET, ACCESS_KEY_ID)
    assert sizes.max_bytes == 1048576000


@pytest.mark.parametrize(
    "key",
    [
        KEY,
        "ota/iot-1/x.zip",
        "a",
        "ota/a_b/c-d.e.f",
        "x/" * 20 + "y",
        "ota/" + "a" * 255,  # the longest segment
    ],
)
def test_valid_keys(key):
    assert is_valid_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/ota/x.bin",
        "ota/../master.key",
        "../master.key",
        "ota/..",
        "ota/./x.bin",
        "ota//x.bin",
        "ota/x.bin/",
        "ota\\x.bin",
        "ota/x\x00.bin",
        "ota/.incoming/abc.part",
        ".incoming/abc.part",
        "ota/.hidden",
        "ota/fw 1.bin",
        "ota/fw+1.bin",
        "ota/fw%2e.bin",
        "ota/fw\n.bin",
        "ota/fw.bin\n",  # a trailing newline, which `$` would let through
        "ota/\u00e9.bin",
        "C:/x.bin",
        "a" * 1024,
        "ota/" + "a" * 256,
    ],
)
def test_invalid_keys_are_refused_everywhere(store, key):
    assert not is_valid_key(key)
    with pytest.raises(ValueError):
        store.upload_form(key, 10, 60)
    with pytest.raises(ValueError):
        store.object_url(key)
    with pytest.raises(ValueError):
        store.presigned_get(key, 60)
    assert store.digest(key) is None
    store.delete(key)  # no error, and nothing outside root is touched


def test_key_from_url(store):
    assert store.key_from_url(store.object_url(KEY)) == KEY
    assert store.key_from_url(store.presigned_get(KEY, 60)) == KEY
    assert store.key_from_url(store.object_url(KEY) + "#frag") == KEY
    assert store.key_from_url(f"{PUBLIC}/oss/otaplane/ota%2Fiot-1%2Fx.bin?Expires=1") == "ota/iot-1/x.bin"
    for url in (
        f"https://other.example.com/oss/otaplane/{KEY}",
        f"http://ota.example.com:8443/oss/otaplane/{KEY}",
        f"{PUBLIC}/oss/otherbucket/{KEY}",
        f"{PUBLIC}/oss/otaplane",
        f"{PUBLIC}/oss/otaplane/",
        f"{PUBLIC}/oss/otaplane/../master.key",
        f"{PUBLIC}/oss/otaplane/ota/%2e%2e/%2e%2e/master.key",
        f"{PUBLIC}/oss/otaplaneX/{KEY}",
        f"https://iotx-ota.oss-cn-shanghai.aliyuncs.com/{KEY}",
        "",
        "not a url",
    ):
        assert store.key_from_url(url) is None, url


def test_presigned_get(store):
    url = store.presigned_get(KEY, 300)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC
    assert parts.path == f"/oss/otaplane/{KEY}"
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert query["OSSAccessKeyId"] == ACCESS_KEY_ID
    assert time.time() + 290 < int(query["Expires"]) <= time.time() + 301
    verify_presigned(query, BUCKET, KEY, ACCESS_KEY_ID, SECRET, time.time())


def put(store: LocalBlobStore, key: str, data: bytes) -> None:
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_digest_streams_size_md5_sha256(store):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB chunks plus a tail
    put(store, KEY, data)
    digest = store.digest(KEY)
    assert digest is not None
    assert digest.size == len(data)
    assert digest.md5 == hashlib.md5(data).hexdigest()
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    put(store, "ota/empty.bin", b"")
    assert store.digest("ota/empty.bin").md5 == hashlib.md5(b"").hexdigest()


def test_digest_of_missing_objects(store):
    assert store.digest(KEY) is None
    put(store, "ota/dir/file.bin", b"x")
    assert store.digest("ota/dir") is None  # a directory is no object
    assert store.digest("ota/dir/file.bin/more") is None


def test_delete_is_idempotent(store):
    put(store, KEY, b"firmware")
    store.delete(KEY)
    assert not (store.root / KEY).exists()
    assert store.digest(KEY) is None
    store.delete(KEY)
    store.delete("ota/never/was.bin")


def test_symlinks_out_of_root_are_not_followed(store, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (store.root / "ota").mkdir(parents=True)
    (store.root / "ota" / "link.bin").symlink_to(outside)
    (store.root / "ota" / "dir").mkdir()
    for key in ("ota/link.bin", "ota/dir"):  # a symlinked file, a folder: no object to read
        assert store.digest(key) is None
        assert store.read(key, 100) is None
        assert store.read_range(key, 0, 100) is None
    store.delete("ota/link.bin")
    assert outside.read_text() == "secret"


def test_downloads_refuse_a_symlinked_file_or_folder(store, tmp_path):
    """The GET path's own check (_open_object): a folder resolved once, the file with O_NOFOLLOW."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"secret")
    (store.root / "ota" / "real").mkdir(parents=True)
    (store.root / "ota" / "real" / "fw.bin").write_bytes(b"firmware")
    (store.root / "ota" / "real" / "link.bin").symlink_to(outside / "secret.bin")
    (store.root / "ota" / "linked").symlink_to(outside)

    path, st, content, _, handle = store._open_object("ota/real/fw.bin", True)  # noqa: SLF001
    assert (content, st.st_size, path, handle) == (b"firmware", 8, store.root / "ota" / "real" / "fw.bin", None)
    *_, content, _, handle = store._open_object("ota/real/fw.bin", False)  # noqa: SLF001
    with handle:  # not read: open, to stream from
        assert (content, handle.read()) == (None, b"firmware")
    for key in ("ota/real/link.bin", "ota/linked/secret.bin"):
        with pytest.raises(OssError):
            store._open_object(key, True)  # noqa: SLF001
    with pytest.raises(FileNotFoundError):
        store._open_object("ota/real/missing.bin", True)  # noqa: SLF001


def test_read_range(store):
    data = os.urandom(10_000)
    put(store, KEY, data)
    assert store.read_range(KEY, 0, 5120) == data[:5120]
    assert store.read_range(KEY, 5120, 5120) == data[5120:]  # fewer at the end
    assert store.read_range(KEY, len(data), 10) == b""  # none past it
    assert store.read_range("ota/missing.bin", 0, 10) is None
    assert store.read_range("../escape", 0, 10) is None


def test_sweep_incoming_deletes_only_temp_files_idle_past_the_limit(store):
    """The temp files of a process killed mid-upload were kept for ever (found by an audit)."""
    assert store.sweep_incoming() == 0  # no .incoming folder yet
    incoming = store.root / ".incoming"
    incoming.mkdir(parents=True)
    day_ago = time.time() - 24 * 3600 - 60
    for name in ("dead.part", "not-a-temp-file"):
        (incoming / name).write_bytes(b"x")
        os.utime(incoming / name, (day_ago, day_ago))
    (incoming / "live.part").write_bytes(b"being written")
    assert store.sweep_incoming() == 1
    assert sorted(path.name for path in incoming.iterdir()) == ["live.part", "not-a-temp-file"]


def test_sweep_incoming_deletes_a_dead_process_s_temp_file_without_waiting_a_day(store):
    """A server killed mid-upload left up to 1000 MB in .incoming for a day. A live upload holds
    its temp file's lock, which the system releases when its process dies: a file older than a
    minute whose lock is free goes at the next sweep; a live upload's file stays, however idle."""
    import subprocess
    import sys
    import textwrap

    from otaplane.blobs.oss_signing import SizeRange
    from otaplane.blobs.post_object import Upload

    incoming = store.root / ".incoming"
    killed = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from otaplane.blobs.oss_signing import SizeRange
        from otaplane.blobs.post_object import Upload
        upload = Upload.open(Path({str(incoming)!r}), {{"key": "ota/a.bin"}}, SizeRange(0, 10**9))
        upload.handle.write(b"half of it")
        upload.handle.flush()
        os._exit(9)  # killed mid-upload: no discard, no cleanup
    """)
    subprocess.run([sys.executable, "-c", killed], check=False, timeout=60)
    (dead,) = incoming.iterdir()
    live = Upload.open(incoming, {"key": "ota/b.bin"}, SizeRange(0, 10**9))
    live.handle.write(b"a client that went quiet")
    young = incoming / "young.part"  # unlocked but new: maybe an upload between its open and its lock
    young.write_bytes(b"x")
    two_minutes_ago = time.time() - 120
    for path in (dead, live.temp):
        os.utime(path, (two_minutes_ago, two_minutes_ago))
    try:
        assert store.sweep_incoming() == 1
        assert sorted(incoming.iterdir()) == sorted([live.temp, young])
    finally:
        live.discard()
    assert sorted(incoming.iterdir()) == [young]


def test_an_upload_whose_temp_file_was_swept_is_refused_at_commit(store):
    """A client silent for the whole idle limit mid-upload: its commit answers OSS's
    RequestTimeout, not a 500, and stores nothing."""
    from otaplane.blobs.oss_signing import SizeRange
    from otaplane.blobs.post_object import Upload

    target = store.root / KEY
    upload = Upload.open(store.root / ".incoming", {"key": KEY}, SizeRange(0, 100))
    upload.handle.write(b"partial")
    assert store.sweep_incoming(idle_s=-1) == 1
    with pytest.raises(OssError) as refused:
        store._publish(upload)
    assert (refused.value.status, refused.value.code) == (400, "RequestTimeout")
    upload.discard()
    assert not target.exists()


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest().upper()}"'


def stored_etag(store: LocalBlobStore, key: str) -> str | None:
    return store._open_object(key, True)[3]  # noqa: SLF001


def test_an_uploaded_object_keeps_its_md5_as_its_etag_until_deleted(store):
    """OSS gives a PostObject upload its MD5 as ETag: kept while the upload streams in, and
    removed with the object (the collector of unreferenced objects deletes through delete())."""
    data = os.urandom(300_000)
    store_as_received(store, KEY, data)
    assert store.read(KEY, len(data)) == data
    assert stored_etag(store, KEY) == md5_etag(data)
    assert list((store.root / ".incoming").iterdir()) == []
    store.delete(KEY)
    assert not (store.root / KEY).exists()
    assert not (store.root / ".md5" / KEY).exists()


def test_a_kept_md5_counts_only_for_the_file_it_describes(store):
    """An object stored before MD5 ETags (no sidecar), or changed behind the store's back, keeps
    the ETag from size and mtime: never an MD5 of other bytes."""
    put(store, "ota/older.bin", b"stored before md5 etags")
    assert stored_etag(store, "ota/older.bin") is None
    store_as_received(store, KEY, b"firmware")
    assert stored_etag(store, KEY) == md5_etag(b"firmware")  # now remembered
    path = store.root / KEY
    st = path.stat()
    path.write_bytes(b"FIRMWARE")  # same size, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert stored_etag(store, KEY) is None


def test_an_md5_that_cannot_be_kept_leaves_the_upload_stored(store):
    store.root.mkdir(parents=True)
    (store.root / ".md5").write_bytes(b"")  # a file where the sidecar folder would be
    store_as_received(store, KEY, b"firmware")
    assert store.read(KEY, 100) == b"firmware"
    assert stored_etag(store, KEY) is None
    assert list((store.root / ".incoming").iterdir()) == []


def test_an_upload_ending_after_its_adoption_hour_is_refused_and_stores_nothing(tmp_path, monkeypatch):
    """A post begun while its form was valid but still streaming when the hour to create a
    package from it ran out stored an object after the collector had forgotten its upload: nobody's,
    kept for good (found by an audit). It is refused at its end, and the temp file goes."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from otaplane.blobs import post_object
    from otaplane.services import firmware as firmware_service

    # The receiver's limit ends before the collector's grace, clock skew between replicas included.
    assert (firmware_service.UPLOAD_POLICY_TTL_S + post_object.UPLOAD_TIME_LIMIT_S + firmware_service.CLOCK_SKEW_S
            ) * 1000 < firmware_service.UPLOAD_ADOPTION_GRACE_MS
    store = LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:19080", "secret")
    client = TestClient(Starlette(routes=store.routes()), base_url="http://127.0.0.1:19080")
    form = store.upload_form(KEY, max_bytes=100, expires_in_s=60)
    real_time = time.time
    ended_at = {"now": real_time() + 60 + post_object.UPLOAD_TIME_LIMIT_S + 1}

    class LateClock:  # the policy is checked at the start; the post ends an hour later
        @staticmethod
        def time():
            return ended_at["now"] if late["yes"] else real_time()

    late = {"yes": False}
    original_receive = post_object.PostObjectReceiver._receive

    async def receive_then_late(self, request):
        upload = await original_receive(self, request)
        late["yes"] = True
        return upload

    monkeypatch.setattr(post_object, "time", LateClock)
    monkeypatch.setattr(post_object.PostObjectReceiver, "_receive", receive_then_late)
    response = client.post(form.host, data=form.fields, files={"file": ("fw.bin", b"late bytes")})
    assert response.status_code == 400 and b"<Code>RequestTimeout</Code>" in response.content
    assert not (store.root / KEY).exists()
    assert list((store.root / ".incoming").iterdir()) == []
    monkeypatch.setattr(post_object.PostObjectReceiver, "_receive", original_receive)
    late["yes"] = False
    form = store.upload_form(KEY, max_bytes=100, expires_in_s=60)  # in time: stored as before
    assert client.post(form.host, data=form.fields, files={"file": ("fw.bin", b"on time")}).status_code == 204
    assert (store.root / KEY).read_bytes() == b"on time"
