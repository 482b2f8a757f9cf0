"""The device channel in this process (as `otaplane serve` runs it, minus HTTP): a push made in
the same process reaches the device at once, without waiting for the next poll."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time

import pytest

from otaplane.devices import broker as channel_module
from otaplane.devices.broker import DeviceChannel
from otaplane.server import prepare
from otaplane.services.container import Services
from otaplane.services.devices import DeviceRef
from otaplane.services.firmware import NewFirmware
from otaplane.services.products import NewProduct
from otaplane.settings import Settings
from otaplane.store import uploads
from tests.support.devices import connect, device_password, raw_connect
from tests.support.server import free_port


@contextlib.contextmanager
def channel_in_a_thread(data_dir):
    """(services, channel) with the channel's event loop running in a thread of this process."""
    services = Services.build(Settings(data_dir=data_dir))
    prepare(services)
    channel = DeviceChannel(services, "127.0.0.1", free_port())
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(channel.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield services, channel
    finally:
        asyncio.run_coroutine_threadsafe(channel.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        services.close()


@pytest.fixture()
def running(tmp_path, monkeypatch):
    """(services, channel) in this process; its poll would wait 60 s."""
    monkeypatch.setattr(channel_module, "PENDING_POLL_INTERVAL_S", 60.0)
    with channel_in_a_thread(tmp_path) as started:
        yield started


def test_an_in_process_push_is_delivered_without_waiting_for_the_poll(running, tmp_path):
    services, channel = running
    services.accounts.create_key("inproc")
    tenant = services.accounts.tenant_by_name("inproc")
    product = services.products.create(tenant, NewProduct(product_name="inproc", node_type=0))
    device = services.devices.register(tenant, product.product_key, "inproc-dev", None)

    content = b"in-process firmware" * 50
    key = f"ota/{tenant.instance_id}/inproc.bin"
    path = services.blobs.root / key  # the local store keeps an object as a file under its key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with services.db.begin() as conn:
        uploads.record(conn, key, tenant.instance_pk, int(time.time() * 1000))
    firmware = services.firmware.create(tenant, NewFirmware(
        product_key=product.product_key, name="inproc", dest_version="9.0.0",
        firmware_url=services.blobs.object_url(key)))

    client = connect(channel.port, product.product_key, "inproc-dev", device.device_secret)
    try:
        deadline = time.monotonic() + 10
        while not channel.is_online(services.devices.credentials(product.product_key, "inproc-dev").device_id):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        pushed = services.device_ota.push(tenant, DeviceRef(product_key=product.product_key,
                                                            device_name="inproc-dev"), firmware.firmware_id)
        body = client.expect(client.upgrade_topic, timeout=5).json()
        elapsed = time.monotonic() - started
        assert body["id"] == pushed.message_id
        assert body["data"]["md5"] == hashlib.md5(content).hexdigest()
        assert elapsed < 2, elapsed  # the poll would take 60 s
    finally:
        client.close()


def test_a_burst_bigger_than_a_page_is_delivered_in_one_sweep(running):
    """Pages follow each other at once (keyset paging), not one page per poll interval."""
    services, channel = running
    channel.undelivered_batch = 2  # 5 pushes: 3 pages
    services.accounts.create_key("burst")
    tenant = services.accounts.tenant_by_name("burst")
    product = services.products.create(tenant, NewProduct(product_name="burst", node_type=0))
    names = [f"burst-{i}" for i in range(5)]
    secrets = {name: services.devices.register(tenant, product.product_key, name, None).device_secret
               for name in names}
    key = f"ota/{tenant.instance_id}/burst.bin"
    path = services.blobs.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"burst firmware")
    with services.db.begin() as conn:
        uploads.record(conn, key, tenant.instance_pk, int(time.time() * 1000))
    firmware = services.firmware.create(tenant, NewFirmware(
        product_key=product.product_key, name="burst", dest_version="3.0.0",
        firmware_url=services.blobs.object_url(key)))
    ids = [services.devices.credentials(product.product_key, name).device_id for name in names]
    from otaplane.store import device_ota as store

    with services.db.connect() as conn:
        firmware_pk = store.firmware_row(conn, None, firmware.firmware_id)["id"]

    clients = [connect(channel.port, product.product_key, name, secrets[name]) for name in names]
    try:
        deadline = time.monotonic() + 10
        while not all(channel.is_online(i) for i in ids):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pushed = services.device_ota.push_many(firmware_pk, ids)  # one wake for the five
        for client, push in zip(clients, pushed):
            body = client.expect(client.upgrade_topic, timeout=5).json()  # the poll would take 60 s
            assert body["id"] == push.message_id
    finally:
        for client in clients:
            client.close()


def test_a_stalled_process_taken_for_dead_marks_its_devices_online_again(running):
    """Another process released this one's devices (its heartbeat looked stale): at its next beat
    it learns so, and the connections it still holds are ONLINE again."""
    import sqlalchemy as sa

    from otaplane.store.schema import channel_nodes, devices

    services, channel = running
    services.accounts.create_key("stall")
    tenant = services.accounts.tenant_by_name("stall")
    product = services.products.create(tenant, NewProduct(product_name="stall", node_type=0))
    secret = services.devices.register(tenant, product.product_key, "stall-dev", None).device_secret
    device_id = services.devices.credentials(product.product_key, "stall-dev").device_id
    client = connect(channel.port, product.product_key, "stall-dev", secret)
    try:
        deadline = time.monotonic() + 10
        while not channel.is_online(device_id):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with services.db.begin() as conn:  # what another process's release does
            conn.execute(sa.delete(channel_nodes).where(channel_nodes.c.node_id == channel.node_id))
            conn.execute(sa.update(devices).where(devices.c.id == device_id).values(online=False))
        assert asyncio.run_coroutine_threadsafe(channel._beat(), channel._loop).result(10) is False  # noqa: SLF001
        asyncio.run_coroutine_threadsafe(channel._mark_online_again(), channel._loop).result(10)  # noqa: SLF001
        with services.db.connect() as conn:
            row = conn.execute(sa.select(devices.c.online, devices.c.online_node).where(devices.c.id == device_id)).one()
        assert (row.online, row.online_node) == (True, channel.node_id)
        assert channel.is_online(device_id)
    finally:
        client.close()


@pytest.mark.parametrize("keepalive", [0, 1201])
def test_a_device_asking_for_no_keepalive_is_still_closed_when_silent(tmp_path, monkeypatch, keepalive):
    """Keep-alive 0 set no idle limit at all: a device gone behind a NAT stayed ONLINE (found by an
    audit). It gets the platform's longest, 1200 s (1 s here)."""
    monkeypatch.setattr(channel_module, "MAX_KEEPALIVE_S", 1)
    with channel_in_a_thread(tmp_path) as (services, channel):
        services.accounts.create_key("keepalive")
        tenant = services.accounts.tenant_by_name("keepalive")
        product = services.products.create(tenant, NewProduct(product_name="keepalive", node_type=0))
        secret = services.devices.register(tenant, product.product_key, "quiet", None).device_secret
        client_id = f"{product.product_key}&quiet"
        password = device_password(secret, client_id, "quiet", product.product_key, None, "hmacsha1")
        sock, connack = raw_connect(channel.port, client_id + "|signmethod=hmacsha1|",
                                    f"quiet&{product.product_key}", password, keepalive=keepalive)
        with sock:
            assert connack == b"\x20\x02\x00\x00"
            started = time.monotonic()
            sock.settimeout(10)
            assert sock.recv(10) == b""  # the server closed it
            assert time.monotonic() - started < 5
