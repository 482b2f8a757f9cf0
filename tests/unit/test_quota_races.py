"""Count limits under concurrent creates (replicas, or worker threads of one server): 500
packages per instance, 10 custom modules per product. Each create counted, then inserted; two
creates on two replicas both counted below the limit and both inserted (501 packages and 12
custom modules seen with three replicas on PostgreSQL). Real services, on each database backend;
the first create is held inside its transaction, just after its insert, while the second runs.
The limits are lowered to 1 so that the second create is the one over it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from otaplane import errors
from otaplane.services import firmware as firmware_module
from otaplane.services import modules as modules_module
from otaplane.services.container import Services
from otaplane.services.firmware import NewFirmware
from otaplane.services.products import NewProduct
from tests.conftest import BACKENDS
from tests.support.services import fresh_services

BLOCKED_S = 0.5  # long enough for the second create to reach its count


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path, postgres) -> Iterator[Services]:
    with fresh_services(request.param, tmp_path, postgres) as built:
        yield built


def first_insert_held(monkeypatch, module, name: str) -> tuple[threading.Event, threading.Event]:
    """`module.name` (an insert) holds its first call's transaction open, after the insert,
    until `go` is set; `inserted` tells that it got there."""
    inserted, go = threading.Event(), threading.Event()
    real = getattr(module, name)

    def insert_then_hold(*args, **kwargs):
        result = real(*args, **kwargs)
        if not inserted.is_set():
            inserted.set()
            assert go.wait(30)
        return result

    monkeypatch.setattr(module, name, insert_then_hold)
    return inserted, go


def race(first, second, inserted: threading.Event, go: threading.Event) -> list:
    """Run `first` until its insert, then `second`; let `first` commit; both outcomes."""
    results: list = [None, None]

    def run(index, call):
        try:
            results[index] = call()
        except Exception as exc:  # the outcome under test
            results[index] = exc

    threads = [threading.Thread(target=run, args=(0, first), daemon=True)]
    threads[0].start()
    assert inserted.wait(30)
    threads.append(threading.Thread(target=run, args=(1, second), daemon=True))
    threads[1].start()
    time.sleep(BLOCKED_S)
    go.set()
    for thread in threads:
        thread.join(60)
    return results


def setup(services: Services):
    tenant = services.accounts.tenant_by_name("default")
    product_key = services.products.create(tenant, NewProduct(product_name="quota", node_type=0)).product_key
    return tenant, product_key


def uploaded(services: Services, tenant, content: bytes) -> str:
    form, _ = services.firmware.new_upload(tenant, "bin")
    path = services.blobs.root / form.key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return form.object_url


def test_concurrent_creates_keep_the_package_limit(services, monkeypatch):
    tenant, product_key = setup(services)
    urls = [uploaded(services, tenant, b"one"), uploaded(services, tenant, b"two")]  # no shared upload row lock
    monkeypatch.setattr(firmware_module, "MAX_PACKAGES_PER_INSTANCE", 1)
    inserted, go = first_insert_held(monkeypatch, firmware_module.store, "insert")

    def create(name: str, url: str):
        return lambda: services.firmware.create(tenant, NewFirmware(product_key, name, "1.0", firmware_url=url))

    results = race(create("p1", urls[0]), create("p2", urls[1]), inserted, go)

    assert not isinstance(results[0], Exception), results[0]
    assert isinstance(results[1], errors.ApiError), results[1]  # was a second package over the limit
    assert results[1].code == "iot.ota.FirmwareCountExceeded"
    assert services.firmware.page(tenant, 1, 10, None, None).total == 1


def test_concurrent_creates_keep_the_custom_module_limit(services, monkeypatch):
    tenant, product_key = setup(services)
    monkeypatch.setattr(modules_module, "MAX_CUSTOM_MODULES", 1)
    inserted, go = first_insert_held(monkeypatch, modules_module.store, "insert")

    results = race(lambda: services.modules.create(tenant, product_key, "m1", None, None),
                   lambda: services.modules.create(tenant, product_key, "m2", None, None),
                   inserted, go)

    assert results[0] is None, results[0]
    assert isinstance(results[1], errors.ApiError), results[1]  # was a second custom module over the limit
    assert results[1].code == "iot.ota.ModuleCountExceeded"
