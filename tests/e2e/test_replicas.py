"""Two server processes on ONE database (the shared server of each backend plus a second process
on the same data dir and database URL): replay protection, data and key revocation are shared."""

from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace
from urllib.parse import urlencode

import httpx
import pytest
from alibabacloud_openapi_util.client import Client as OpenApiUtil

from tests.support.clients import RawSigner, iot_models, tea_client, wait_until_revoked
from tests.support.server import ServerProcess

LIST = {"CurrentPage": "1", "PageSize": "10"}


@pytest.fixture(scope="module")
def replicas(server):
    """(first, second): the backend's shared server and a second process on its database.

    Same data dir, so the same master.key (replicas must share it) and the same log file.
    """
    second = ServerProcess(server.data_dir, server.database_url, ("--rate-limit", "0"))
    try:
        yield server, second.start()
    finally:
        second.stop()


@pytest.fixture(scope="module")
def key(replicas) -> tuple[str, str]:
    return replicas[0].create_key(f"replicas-{uuid.uuid4().hex[:8]}")


def _send_v1(base_url: str, signed: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/?{urlencode(signed)}", timeout=30)


def _signed_v3(first: ServerProcess, key: tuple[str, str], action: str, query: dict) -> dict:
    """V3 headers (with Authorization) signed once, for the first server's host."""
    signer = RawSigner(first.base_url, *key)
    headers = signer.v3_headers(action, query)
    request = SimpleNamespace(method="POST", pathname="/", query=dict(query), headers=dict(headers))
    authorization = OpenApiUtil.get_authorization(
        request, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"], key[0], key[1]
    )
    return {**headers, "Authorization": authorization}


def _assert_nonce_used(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["Code"] == "SignatureNonceUsed", response.text


def test_v1_nonce_used_on_one_replica_is_refused_by_the_other(replicas, key):
    first, second = replicas
    for accepting, refusing in ((first, second), (second, first)):
        signed = RawSigner(accepting.base_url, *key).v1_params("QueryProductList", LIST)
        accepted = _send_v1(accepting.base_url, signed)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["Success"] is True
        _assert_nonce_used(_send_v1(refusing.base_url, signed))
        _assert_nonce_used(_send_v1(accepting.base_url, signed))


def test_v3_nonce_used_on_one_replica_is_refused_by_the_other(replicas, key):
    first, second = replicas
    headers = _signed_v3(first, key, "QueryProductList", LIST)  # `host` stays the first's: both get it
    url = f"/?{urlencode(LIST)}"
    accepted = httpx.post(first.base_url + url, headers=headers, timeout=30)
    assert accepted.status_code == 200, accepted.text
    _assert_nonce_used(httpx.post(second.base_url + url, headers=headers, timeout=30))


def test_a_nonce_raced_to_both_replicas_is_accepted_once(replicas, key):
    first, second = replicas
    for _ in range(8):
        signed = RawSigner(first.base_url, *key).v1_params("QueryProductList", LIST)
        barrier = threading.Barrier(2)
        results: dict[str, httpx.Response] = {}

        def send(name: str, base_url: str) -> None:
            barrier.wait()
            results[name] = _send_v1(base_url, signed)

        threads = [threading.Thread(target=send, args=(n, s.base_url)) for n, s in (("1", first), ("2", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(r.status_code for r in results.values())
        assert statuses == [200, 400], {n: r.text for n, r in results.items()}
        _assert_nonce_used(next(r for r in results.values() if r.status_code == 400))


def test_products_are_shared(replicas, key):
    first, second = replicas
    via_first = tea_client(first.endpoint, *key)
    via_second = tea_client(second.endpoint, *key, signature="v2")
    name = "r_" + uuid.uuid4().hex[:12]

    created = via_first.create_product(iot_models.CreateProductRequest(product_name=name, node_type=0)).body
    assert created.success, created
    product_key = created.product_key

    seen = via_second.query_product(iot_models.QueryProductRequest(product_key=product_key)).body
    assert seen.success and seen.data.product_name == name
    assert seen.data.product_secret == created.data.product_secret
    listed = via_second.query_product_list(iot_models.QueryProductListRequest(current_page=1, page_size=200)).body
    assert product_key in [p.product_key for p in listed.data.list.product_info]

    # The name is taken for the other replica too.
    duplicate = via_second.create_product(iot_models.CreateProductRequest(product_name=name, node_type=0)).body
    assert (duplicate.success, duplicate.code) == (False, "iot.prod.AlreadyExistedProductName")

    renamed = name + "_x"
    assert via_second.update_product(
        iot_models.UpdateProductRequest(product_key=product_key, product_name=renamed, description="via 2")
    ).body.success
    seen = via_first.query_product(iot_models.QueryProductRequest(product_key=product_key)).body
    assert (seen.data.product_name, seen.data.description) == (renamed, "via 2")

    assert via_first.delete_product(iot_models.DeleteProductRequest(product_key=product_key)).body.success
    gone = via_second.query_product(iot_models.QueryProductRequest(product_key=product_key)).body
    assert (gone.success, gone.code) == (False, "iot.prod.NotExistedProduct")


def test_one_name_raced_to_both_replicas_creates_one_product(replicas, key):
    first, second = replicas
    for _ in range(5):
        name = "race_" + uuid.uuid4().hex[:12]
        barrier = threading.Barrier(2)
        results: dict[str, dict] = {}

        def create(label: str, base_url: str) -> None:
            signed = RawSigner(base_url, *key).v1_params("CreateProduct", {"ProductName": name, "NodeType": "0"})
            barrier.wait()
            response = _send_v1(base_url, signed)
            results[label] = {"status": response.status_code, **response.json()}

        threads = [threading.Thread(target=create, args=(n, s.base_url)) for n, s in (("1", first), ("2", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        outcomes = sorted((r["status"], r["Success"], r["Code"]) for r in results.values())
        assert outcomes == [(200, False, "iot.prod.AlreadyExistedProductName"), (200, True, "")], results


def test_keys_work_and_are_revoked_on_every_replica(replicas):
    first, second = replicas
    key_id, secret = first.create_key(f"replicas-revoke-{uuid.uuid4().hex[:8]}")
    for replica in replicas:
        assert RawSigner(replica.base_url, key_id, secret).v1("QueryProductList", LIST).status_code == 200
    second.cli("keys", "revoke", key_id)
    for replica in replicas:
        wait_until_revoked(replica.base_url, key_id, secret)  # within the key cache's TTL (1 s)
        for _ in range(3):  # and for good
            response = RawSigner(replica.base_url, key_id, secret).v1("QueryProductList", LIST)
            assert response.status_code == 400, response.text
            assert response.json()["Code"] == "InvalidAccessKeyId.Inactive"
