"""The local store after a crash at each step of an upload, on a full disk, and under racing
uploads, deletes and downloads."""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import warnings

import pytest
import xmltodict
from starlette.applications import Starlette
from starlette.testclient import TestClient

from otaplane.blobs import local
from otaplane.blobs.local import LocalBlobStore
from otaplane.blobs.oss_signing import OssError
from otaplane.blobs.post_object import Upload
from tests.support.uploads import store_as_received

KEY = "ota/iot-1a2b3c4d/crash.bin"
DATA = os.urandom(300_000)
CRASHED = 77
# The steps of an upload that touch the disk: a crash (os._exit) is simulated before each one.
STEPS = ("open", "fsync", "link", "replace", "unlink", "mkdir")


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest().upper()}"'


def stored_etag(store: LocalBlobStore, key: str) -> str | None:
    return store._open_object(key, True)[3]  # noqa: SLF001


def new_store(root) -> LocalBlobStore:
    return LocalBlobStore(root=root, public_url="https://ota.example.com", secret="unit-secret")


def count_steps(monkeypatch, tmp_path) -> int:
    """How many disk steps an upload takes, from its temp file to its answer."""
    calls = []
    for name in STEPS:
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *args, _real=real, **kwargs: calls.append(1) or _real(*args, **kwargs))
    store = new_store(tmp_path / "counted")
    store_as_received(store, KEY, DATA)
    monkeypatch.undo()
    assert stored_etag(store, KEY) == md5_etag(DATA)
    return len(calls)


def crash_at(root, step: int) -> None:
    """Upload in a child process that dies before its `step`-th disk step, as kill -9 would."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            calls = [0]

            def dying(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os._exit(CRASHED)
                    return real(*args, **kwargs)
                return call

            for name in STEPS:
                setattr(os, name, dying(getattr(os, name)))
            store_as_received(new_store(root), KEY, DATA)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == CRASHED, step


def test_after_a_crash_at_any_step_of_an_upload_a_stored_object_has_its_md5_etag(monkeypatch, tmp_path):
    """The MD5 sidecar was written after the object appeared: a crash in between left an object
    whose ETag came from size and time, and changed once another upload... never came (found by
    an audit). Now either the object is there with its MD5, or the form posted again stores it."""
    steps = count_steps(monkeypatch, tmp_path)
    assert steps >= 6
    outcomes = set()
    for step in range(1, steps + 1):
        root = tmp_path / f"crash-{step}"
        crash_at(root, step)
        store = new_store(root)  # the restart
        if (root / KEY).exists():
            outcomes.add("stored")
            assert store.read(KEY, len(DATA)) == DATA, step
            assert stored_etag(store, KEY) == md5_etag(DATA), step
            with pytest.raises(OssError) as again:  # a form posted again: the object stays
                store_as_received(store, KEY, b"other")
            assert again.value.code == "FileAlreadyExists"
        else:
            outcomes.add("not stored")
            store_as_received(store, KEY, DATA)  # the form posted again
            assert stored_etag(store, KEY) == md5_etag(DATA), step
        assert stored_etag(new_store(root), KEY) == md5_etag(DATA), step
        store.sweep_incoming(idle_s=-1)  # what the crash left in .incoming, a day later
        assert list((root / ".incoming").iterdir()) == [], step
        store.delete(KEY)  # the collector of abandoned uploads: the object and its MD5 go
        assert not (root / KEY).exists() and not (root / ".md5" / KEY).exists(), step
    assert outcomes == {"stored", "not stored"}


def test_an_md5_kept_without_its_object_is_harmless_and_collected(tmp_path):
    """What a crash between the sidecar and the link leaves: no object, so no ETag to give; the
    form posted again replaces the sidecar, and the collector's delete() takes it."""
    store = new_store(tmp_path / "blobs")
    sidecar = store.root / ".md5" / KEY
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(f"{hashlib.md5(b'lost').hexdigest().upper()} 4 1\n")
    assert store.read(KEY, 100) is None
    store.delete(KEY)
    assert not sidecar.exists()
    sidecar.write_text(f"{hashlib.md5(b'lost').hexdigest().upper()} {len(DATA)} 1\n")
    store_as_received(store, KEY, DATA)
    assert stored_etag(store, KEY) == md5_etag(DATA)


def test_the_upload_that_loses_a_key_never_replaces_the_winners_md5(monkeypatch, tmp_path):
    """Two forms for one key, both past the early check for an object: with the sidecar written
    before the link, the loser's, written while the winner was between its own and its link,
    would replace the winner's (its ETag then from size and time, or, same size in the same
    mtime tick, the loser's MD5). The store's lock keeps the second one out until the first is
    done, and then it finds the object."""
    store = new_store(tmp_path / "blobs")
    first_waits, second_wrote, first_linked = threading.Event(), threading.Event(), threading.Event()
    real_publish_once = local._publish_once  # noqa: SLF001

    def publish_once(temp, target):
        if threading.current_thread().name == "first":
            first_waits.set()
            second_wrote.wait(0.5)  # under the lock the second one cannot write: never set
            real_publish_once(temp, target)
            first_linked.set()
        else:  # unlocked, it would have written its sidecar by now: link after the first
            second_wrote.set()
            first_linked.wait(10)
            real_publish_once(temp, target)

    monkeypatch.setattr(local, "_publish_once", publish_once)
    results: dict[str, str] = {}

    def upload(name: str, data: bytes) -> None:
        try:
            store_as_received(store, KEY, data)
            results[name] = "stored"
        except OssError as refused:
            results[name] = refused.code

    first = threading.Thread(target=upload, args=("first", DATA), name="first")
    first.start()
    assert first_waits.wait(10)
    second = threading.Thread(target=upload, args=("second", DATA[::-1]), name="second")
    second.start()
    first.join(10)
    second.join(10)
    assert results == {"first": "stored", "second": "FileAlreadyExists"}
    assert stored_etag(store, KEY) == md5_etag(DATA)


def client_of(store: LocalBlobStore) -> TestClient:
    return TestClient(Starlette(routes=store.routes()), raise_server_exceptions=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("size", [1000, 3 * 1024 * 1024])
def test_a_full_disk_refuses_the_upload_with_an_oss_error_and_keeps_nothing(monkeypatch, tmp_path, size):
    """ENOSPC while the file is written (a big upload) or flushed (a small one, at publish) was a
    plain-text 500; and discarding the small one flushed again, failed again and left its temp
    file on the full disk (found by an audit)."""
    store = new_store(tmp_path / "blobs")
    real_open = Upload.open.__func__

    def on_a_full_disk(cls, incoming, fields, sizes):
        upload = real_open(cls, incoming, fields, sizes)
        upload.handle.close()
        upload.handle = open("/dev/full", "wb")  # every write that reaches the disk: ENOSPC
        return upload

    monkeypatch.setattr(Upload, "open", classmethod(on_a_full_disk))
    form = store.upload_form(KEY, max_bytes=10 * 1024 * 1024, expires_in_s=60)
    response = client_of(store).post(form.host, data=form.fields, files={"file": ("fw.bin", os.urandom(size))})
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/xml")
    assert xmltodict.parse(response.text)["Error"]["Code"] == "ServiceUnavailable"
    assert not (store.root / KEY).exists()
    assert list((store.root / ".incoming").iterdir()) == []


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_download_sends_the_object_it_stat_ed_even_if_deleted_and_posted_again_meanwhile(tmp_path):
    """The GET stat-ed the file, then FileResponse opened its path again to stream it: a delete in
    between (a package deletion, the collector) sent none of its bytes under its Content-Length,
    and a form posted again for the key sent the new file's bytes under the old ETag (found by an
    audit). Now the file opened for the stat is the one streamed, whatever happens to the path."""
    store = new_store(tmp_path / "blobs")
    data = os.urandom(2 * 1024 * 1024 + 5)
    store_as_received(store, KEY, data)
    client = client_of(store)
    url = store.presigned_get(KEY, 60)
    real_open_object = store._open_object  # noqa: SLF001
    before = open_descriptors()

    def deleted_and_posted_again(key, whole):
        opened = real_open_object(key, whole)
        store.delete(key)
        store_as_received(store, key, b"N" * len(data))
        return opened

    store._open_object = deleted_and_posted_again  # noqa: SLF001
    for headers, status, body in (({}, 200, data), ({"Range": "bytes=10-19"}, 206, data[10:20]),
                                  ({"Range": "bytes=0-0,5-6"}, 206, None)):
        response = client.get(url, headers=headers)
        assert response.status_code == status
        assert response.headers["etag"] == md5_etag(data)
        if body is not None:
            assert response.content == body
        else:
            assert data[0:1] in response.content and data[5:7] in response.content
        store.delete(KEY)
        store_as_received(store, KEY, data)
    store._open_object = real_open_object  # noqa: SLF001
    etag = md5_etag(data)
    with warnings.catch_warnings(record=True) as caught:  # a file left to the garbage collector says so
        warnings.simplefilter("always", ResourceWarning)
        for method, headers in (("HEAD", {}), ("GET", {"If-None-Match": etag}), ("GET", {"If-Match": '"other"'}),
                                ("GET", {"Range": f"bytes={len(data)}-"}), ("GET", {"Range": "bytes=0-9"})):
            client.request(method, url, headers=headers)  # every answer closes the file it opened
        gc.collect()
    assert [str(warning.message) for warning in caught if warning.category is ResourceWarning] == []
    assert open_descriptors() == before
