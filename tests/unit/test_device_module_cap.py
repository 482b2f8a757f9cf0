"""The cap on module names kept per device, in DeviceOtaService.apply_reports (the device
channels' group commit): reports of modules new to a full device are refused without failing
their batch, and the modules it has keep updating. Real services, on each database backend."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from otaplane.services.container import Services
from otaplane.services.device_ota import VersionReport
from otaplane.services.devices import MAX_MODULES_PER_DEVICE, DeviceRef
from otaplane.services.products import NewProduct
from tests.conftest import BACKENDS
from tests.support.services import fresh_services


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path, postgres) -> Iterator[Services]:
    with fresh_services(request.param, tmp_path, postgres) as built:
        yield built


def test_a_full_device_refuses_new_modules_and_updates_its_own(services, caplog):
    tenant = services.accounts.tenant_by_name("default")
    product_key = services.products.create(tenant, NewProduct(product_name="caps", node_type=0)).product_key
    full, other = (services.devices.register(tenant, product_key, name, None) for name in ("full-dev", "other-dev"))
    full_id, other_id = (services.devices.credentials(product_key, d.device_name).device_id for d in (full, other))
    kept = ["default"] + [f"m{i}" for i in range(MAX_MODULES_PER_DEVICE - 1)]
    services.device_ota.apply_reports([VersionReport(full_id, module, "1.0") for module in kept])

    results = services.device_ota.apply_reports([
        VersionReport(full_id, "one-too-many", "1.0"), VersionReport(full_id, "m0", "2.0"),
        VersionReport(other_id, "MCU", "1.0"), VersionReport(full_id, "two-too-many", "1.0")])
    assert results == [False, False, False, False]  # nothing pending: False either way, and no exception

    def versions(device) -> dict[str, str]:
        ref = DeviceRef(product_key=product_key, device_name=device.device_name)
        return {m.module_name: m.version for m in services.devices.module_versions(tenant, ref)[1]}

    assert versions(full) == {module: "2.0" if module == "m0" else "1.0" for module in kept}
    assert versions(other) == {"MCU": "1.0"}  # a device's cap is its own
    warnings = [r for r in caplog.records if r.name == "otaplane.devices" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "full-dev" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
