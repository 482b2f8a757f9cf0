"""A server process that dies without closing its device connections: another process (or the
next one) finds its heartbeat stale and marks its devices OFFLINE; live processes keep theirs."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from otaplane.server import prepare
from otaplane.services.container import Services
from otaplane.services.products import NewProduct
from otaplane.settings import Settings
from otaplane.store.schema import channel_nodes, devices
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path, postgres):
    database_url = postgres.create() if request.param == "postgresql" else ""
    services = Services.build(Settings(data_dir=tmp_path, database_url=database_url))
    prepare(services)
    yield services
    services.close()


def _online(services, ids) -> list[bool]:
    with services.db.connect() as conn:
        rows = dict(conn.execute(sa.select(devices.c.id, devices.c.online).where(devices.c.id.in_(ids))).all())
    return [rows[i] for i in ids]


def _beat_at(services, node: str, heartbeat_ms: int) -> None:
    with services.db.begin() as conn:
        conn.execute(sa.update(channel_nodes).where(channel_nodes.c.node_id == node).values(heartbeat_ms=heartbeat_ms))


def test_the_devices_of_a_silent_process_go_offline(services):
    services.accounts.create_key("hb")
    tenant = services.accounts.tenant_by_name("hb")
    product = services.products.create(tenant, NewProduct(product_name="hbprod", node_type=0))
    ids = []
    for name in ("on-dead", "on-live", "moved"):
        services.devices.register(tenant, product.product_key, name, None)
        ids.append(services.devices.credentials(product.product_key, name).device_id)
    dead, live, moved = ids

    assert services.devices.channel_heartbeat("node-a", 60_000) == (False, 0)  # first beats
    assert services.devices.channel_heartbeat("node-b", 60_000) == (False, 0)
    services.devices.mark_connected_many([(dead, None), (moved, None)], "node-a")
    services.devices.mark_connected_many([(live, None)], "node-b")
    services.devices.mark_connected_many([(moved, None)], "node-b")  # reconnected through node-b
    assert _online(services, ids) == [True, True, True]

    # node-a stops beating; node-b's next beat finds it stale.
    _beat_at(services, "node-a", 1)
    assert services.devices.channel_heartbeat("node-b", 60_000) == (True, 1)
    assert _online(services, ids) == [False, True, True]
    with services.db.connect() as conn:
        assert conn.execute(sa.select(channel_nodes.c.node_id)).scalars().all() == ["node-b"]
    # A fresh heartbeat is never stale.
    assert services.devices.channel_heartbeat("node-b", 60_000) == (True, 0)
    assert _online(services, ids) == [False, True, True]
    # node-a was only stalled: its next beat learns it was taken for dead (it re-marks its devices).
    assert services.devices.channel_heartbeat("node-a", 60_000) == (False, 0)

    services.devices.forget_channel("node-b")
    with services.db.connect() as conn:
        assert conn.execute(sa.select(channel_nodes.c.node_id)).scalars().all() == ["node-a"]
