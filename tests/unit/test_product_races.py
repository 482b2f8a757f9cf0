"""DeleteProduct and a registration racing: exactly one wins, and the loser gets the business
error that says why (the refused INSERT or DELETE on a foreign key was a 500, or a registration
into a deleted product said the name was taken). The interleavings are forced: the check that
would have seen the other side is made to look first. Real services, on each database backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from otaplane import errors
from otaplane.services import devices as devices_module
from otaplane.services import products as products_module
from otaplane.services.container import Services
from otaplane.services.products import NewProduct
from tests.conftest import BACKENDS
from tests.support.services import fresh_services


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path, postgres) -> Iterator[Services]:
    with fresh_services(request.param, tmp_path, postgres) as built:
        yield built


def product(services: Services):
    tenant = services.accounts.tenant_by_name("default")
    return tenant, services.products.create(tenant, NewProduct(product_name="race", node_type=0)).product_key


def test_a_device_registered_after_the_delete_checked_makes_the_delete_refused(services, monkeypatch):
    tenant, product_key = product(services)
    real_check = products_module.ProductService._refuse_if_in_use

    def check_then_a_device_arrives(conn, row):
        real_check(conn, row)  # no device yet...
        monkeypatch.setattr(products_module.ProductService, "_refuse_if_in_use", staticmethod(real_check))
        services.devices.register(tenant, product_key, "late-device", None)  # ...then one comes in

    monkeypatch.setattr(products_module.ProductService, "_refuse_if_in_use", staticmethod(check_then_a_device_arrives))
    with pytest.raises(errors.ApiError) as refused:
        services.products.delete(tenant, product_key)
    assert refused.value.code == "iot.prod.ProductHasDevices"


def test_a_registration_into_a_product_deleted_meanwhile_says_so(services, monkeypatch):
    tenant, product_key = product(services)
    real_names_taken = devices_module.store.names_taken

    def names_taken_then_the_product_goes(conn, product_id, names):
        taken = real_names_taken(conn, product_id, names)
        services.products.delete(tenant, product_key)  # another request's, committed before the INSERT
        return taken

    monkeypatch.setattr(devices_module.store, "names_taken", names_taken_then_the_product_goes)
    with pytest.raises(errors.ApiError) as refused:
        services.devices.register(tenant, product_key, "too-late", None)
    assert refused.value.code == "iot.prod.NotExistedProduct"  # was AlreadyExistedDeviceName
