"""`DeviceOtaService.undelivered` in pages (keyset on modified_ms, device_id, module_name): the
device channels read a burst page after page, each page after the last key of the one before."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from otaplane.server import prepare
from otaplane.services.container import Services
from otaplane.services.device_ota import PendingKey
from otaplane.services.firmware import NewFirmware
from otaplane.services.products import NewProduct
from otaplane.settings import Settings
from otaplane.store import device_ota as store
from otaplane.store import uploads
from otaplane.store.schema import device_ota_pending, firmware
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path):
    url = ""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create()
    services = Services.build(Settings(data_dir=tmp_path, database_url=url))
    prepare(services)
    yield services
    services.close()


def _pushed_to(services: Services, count: int) -> tuple[list[int], int]:
    """`count` devices of a new product and a firmware for it: (device ids, firmware row id)."""
    services.accounts.create_key("paging")
    tenant = services.accounts.tenant_by_name("paging")
    product = services.products.create(tenant, NewProduct(product_name="paging", node_type=0))
    for i in range(count):
        services.devices.register(tenant, product.product_key, f"dev-{i}", None)
    key = f"ota/{tenant.instance_id}/paging.bin"
    path = services.blobs.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"paging firmware")
    with services.db.begin() as conn:
        uploads.record(conn, key, tenant.instance_pk, int(time.time() * 1000))
    firmware = services.firmware.create(tenant, NewFirmware(
        product_key=product.product_key, name="paging", dest_version="2.0.0",
        firmware_url=services.blobs.object_url(key)))
    ids = [services.devices.credentials(product.product_key, f"dev-{i}").device_id for i in range(count)]
    with services.db.connect() as conn:
        firmware_pk = store.firmware_row(conn, None, firmware.firmware_id)["id"]
    return ids, firmware_pk


def _sweep(services: Services, limit: int, online_only: bool) -> list[PendingKey]:
    keys: list[PendingKey] = []
    after = None
    for _ in range(100):
        page = services.device_ota.undelivered(limit=limit, online_only=online_only, after=after)
        keys += page
        if len(page) < limit:
            return keys
        after = page[-1]
    raise AssertionError("the sweep did not end")


def test_pages_cover_every_undelivered_push_once_in_order(services):
    ids, firmware_pk = _pushed_to(services, 7)
    pushed = services.device_ota.push_many(firmware_pk, ids[:4])  # oldest
    time.sleep(0.005)
    pushed += services.device_ota.push_many(firmware_pk, ids[4:])
    expected = [PendingKey(p.device_id, p.module_name, p.message_id) for p in pushed]

    everything = services.device_ota.undelivered(limit=100, online_only=False)
    assert everything == expected
    for limit in (1, 2, 3, 7):
        assert _sweep(services, limit, online_only=False) == expected, limit

    # online_only: only devices some process has online
    services.devices.mark_connected_many([(ids[1], None), (ids[5], None)], "test-node")
    assert _sweep(services, 1, online_only=True) == [expected[1], expected[5]]

    # delivered ones drop out, and paging goes on after them
    services.device_ota.mark_delivered([(k.device_id, k.module_name, k.message_id) for k in expected[:3]])
    assert _sweep(services, 2, online_only=False) == expected[3:]


def test_a_page_after_a_row_that_is_gone_is_empty(services):
    ids, firmware_pk = _pushed_to(services, 3)
    pushed = services.device_ota.push_many(firmware_pk, ids)
    first = PendingKey(pushed[0].device_id, pushed[0].module_name, pushed[0].message_id)
    assert len(services.device_ota.undelivered(limit=10, online_only=False, after=first)) == 2
    with services.db.begin() as conn:  # the row goes away, as when the device installs the package
        conn.execute(device_ota_pending.delete().where(device_ota_pending.c.device_id == first.device_id))
    assert services.device_ota.undelivered(limit=10, online_only=False, after=first) == []
    assert len(services.device_ota.undelivered(limit=10, online_only=False)) == 2


def test_a_push_racing_the_deletion_of_its_package_is_refused_as_firmware_not_found(services, monkeypatch):
    """`otaplane devices push` while another process deletes the package: the push read the
    package, the deletion committed, and the insert's foreign key refused it, which came out of
    the CLI as a traceback (found by an audit). It is FirmwareNotFound, and nothing is pushed."""
    from otaplane import errors

    ids, firmware_pk = _pushed_to(services, 2)
    tenant = services.accounts.tenant_by_name("paging")
    with services.db.connect() as conn:
        firmware_id = conn.execute(sa.select(firmware.c.firmware_id).where(firmware.c.id == firmware_pk)).scalar_one()
    real = store.device_products

    def deleted_meanwhile(conn, device_ids):
        found = real(conn, device_ids)
        services.firmware.delete(tenant, firmware_id)  # another connection: it commits first
        return found

    monkeypatch.setattr(store, "device_products", deleted_meanwhile)
    with pytest.raises(errors.ApiError) as refused:
        services.device_ota.push_many(firmware_pk, ids)
    assert refused.value.code == "iot.ota.FirmwareNotFound"
    with services.db.connect() as conn:
        assert conn.execute(device_ota_pending.select()).first() is None
