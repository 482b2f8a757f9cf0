"""CreateOTAFirmware hashes its objects outside any transaction (a 1000 MB object takes
seconds): whatever removes an object meanwhile (the collector of abandoned uploads, the deletion
of another package sharing it, the deletion of the module) must leave no package without its
object and no misleading error. The interleavings are forced: the hash step runs the concurrent
action before it returns. The services are real, on each database backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from otaplane import errors
from otaplane.services import firmware as firmware_module
from otaplane.services.container import Services
from otaplane.services.firmware import NewFirmware
from otaplane.services.products import NewProduct
from tests.conftest import BACKENDS
from tests.support.services import fresh_services
from tests.support.uploads import store_as_received


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path, postgres) -> Iterator[Services]:
    with fresh_services(request.param, tmp_path, postgres) as built:
        yield built


def uploaded(services: Services, tenant, content: bytes) -> str:
    """An upload slot with its object in place, as after the form's POST: its FirmwareUrl."""
    form, _ = services.firmware.new_upload(tenant, "bin")
    path = services.blobs.root / form.key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return form.object_url


def while_hashing(services: Services, meanwhile: Callable[[], object]) -> None:
    """The next hash of an object runs `meanwhile` before it returns."""
    real_digest = services.blobs.digest

    def digest(key):
        found = real_digest(key)
        services.blobs.digest = real_digest
        meanwhile()
        return found

    services.blobs.digest = digest


def setup(services: Services):
    tenant = services.accounts.tenant_by_name("default")
    product_key = services.products.create(tenant, NewProduct(product_name="adoption", node_type=0)).product_key
    return tenant, product_key


def test_an_object_its_last_package_released_while_being_hashed_is_not_adopted(services):
    """Package B adopts the object of package A while A is deleted: the deletion finds the
    object unreferenced and removes it, so B must be refused, not left pointing at nothing."""
    tenant, product_key = setup(services)
    url = uploaded(services, tenant, b"shared firmware")
    first = services.firmware.create(tenant, NewFirmware(product_key, "first", "1.0", firmware_url=url))
    while_hashing(services, lambda: services.firmware.delete(tenant, first.firmware_id))
    with pytest.raises(errors.ApiError) as refused:
        services.firmware.create(tenant, NewFirmware(product_key, "second", "1.1", firmware_url=url))
    assert refused.value.code == "iot.ota.FirmwareFileNotFound"
    assert services.firmware.page(tenant, 1, 10, None, None).total == 0


def test_the_collector_does_not_take_an_object_being_adopted(services, monkeypatch):
    tenant, product_key = setup(services)
    url = uploaded(services, tenant, b"late firmware")
    real_now = firmware_module.now_ms

    def collect_after_the_grace():  # the adoption lands just as the grace period runs out
        later = real_now() + firmware_module.UPLOAD_ADOPTION_GRACE_MS + 1
        monkeypatch.setattr(firmware_module, "now_ms", lambda: later)
        assert services.firmware.collect_abandoned_uploads() == 1
        monkeypatch.setattr(firmware_module, "now_ms", real_now)

    while_hashing(services, collect_after_the_grace)
    with pytest.raises(errors.ApiError) as refused:
        services.firmware.create(tenant, NewFirmware(product_key, "late", "1.0", firmware_url=url))
    assert refused.value.code == "iot.ota.FirmwareFileNotFound"


def test_a_package_adopted_first_keeps_its_object_from_the_collector(services, monkeypatch):
    tenant, product_key = setup(services)
    url = uploaded(services, tenant, b"adopted firmware")
    package = services.firmware.create(tenant, NewFirmware(product_key, "adopted", "1.0", firmware_url=url))
    monkeypatch.setattr(firmware_module, "now_ms",
                        lambda real=firmware_module.now_ms: real() + firmware_module.UPLOAD_ADOPTION_GRACE_MS + 1)
    assert services.firmware.collect_abandoned_uploads() == 0
    assert services.blobs.read(package.blob_key, 100) == b"adopted firmware"


def test_a_module_deleted_while_its_package_is_hashed_is_reported_as_such(services):
    tenant, product_key = setup(services)
    services.modules.create(tenant, product_key, "racemod", None, None)
    url = uploaded(services, tenant, b"module firmware")
    while_hashing(services, lambda: services.modules.delete(tenant, product_key, "racemod"))
    with pytest.raises(errors.ApiError) as refused:
        services.firmware.create(tenant, NewFirmware(product_key, "fresh-name", "1.0", firmware_url=url,
                                                     module_name="racemod"))
    assert refused.value.code == "iot.ota.ModuleNotFound"  # was FirmwareNameExisted: a name nobody has


def test_the_collector_removes_an_abandoned_upload_with_its_kept_md5(services, monkeypatch):
    """An upload keeps its MD5 beside it (the local store's ETag): collected together."""
    tenant, _ = setup(services)
    form, _ = services.firmware.new_upload(tenant, "bin")
    store_as_received(services.blobs, form.key, b"never adopted")
    kept_md5 = services.blobs.root / ".md5" / form.key
    assert kept_md5.exists()
    monkeypatch.setattr(firmware_module, "now_ms",
                        lambda real=firmware_module.now_ms: real() + firmware_module.UPLOAD_ADOPTION_GRACE_MS + 1)
    assert services.firmware.collect_abandoned_uploads() == 1
    assert not (services.blobs.root / form.key).exists()
    assert not kept_md5.exists()


def test_a_form_posted_again_after_its_package_was_deleted_leaves_no_object_behind(services, monkeypatch):
    """The form stays valid for its policy's minute: posted again after the package was deleted
    (its object with it), the new object used to be nobody's (no package, no upload record), so
    no collection ever removed it. The record now stays until the form has expired."""
    tenant, product_key = setup(services)
    form, _ = services.firmware.new_upload(tenant, "bin")
    store_as_received(services.blobs, form.key, b"first post")
    created = services.firmware.create(tenant, NewFirmware(product_key, "reposted", "1.0",
                                                           firmware_url=form.object_url))
    services.firmware.delete(tenant, created.firmware_id)
    assert not (services.blobs.root / form.key).exists()
    store_as_received(services.blobs, form.key, b"posted again with the same form")
    with pytest.raises(errors.ApiError) as refused:  # withdrawn: no package adopts it again
        services.firmware.create(tenant, NewFirmware(product_key, "readopted", "1.0", firmware_url=form.object_url))
    assert refused.value.code == "iot.ota.FirmwareFileNotFound"
    assert "withdrawn when the package that held it was deleted" in refused.value.message
    monkeypatch.setattr(firmware_module, "now_ms",
                        lambda real=firmware_module.now_ms: real() + firmware_module.UPLOAD_ADOPTION_GRACE_MS + 1)
    assert services.firmware.collect_abandoned_uploads() == 1
    assert not (services.blobs.root / form.key).exists()
