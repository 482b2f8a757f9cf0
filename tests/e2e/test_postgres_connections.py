"""PostgreSQL connections that break while idle (a server restart, a failover, an idle timeout)
cost no signed request: quick reads (Database.autocommit_read) and the nonce writer each go
again, once, on a new connection. The test ends the server's sessions with
pg_terminate_backend, picking them by application_name (one per pool)."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.conftest import POSTGRES_URL
from tests.support.clients import iot_models, tea_client

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="needs OTAPLANE_TEST_POSTGRES_URL")


@pytest.fixture(scope="module")
def pg_server(make_server):
    return make_server("postgresql", "--rate-limit", "0")


@pytest.fixture(scope="module")
def client(pg_server):
    key_id, secret = pg_server.create_key(f"pg-connections-{uuid.uuid4().hex[:8]}")
    return tea_client(pg_server.endpoint, key_id, secret)


@pytest.fixture(scope="module")
def product_key(client) -> str:
    created = client.create_product(iot_models.CreateProductRequest(
        product_name=f"pgconn_{uuid.uuid4().hex[:8]}", node_type=0)).body
    assert created.success, created
    return created.data.product_key


def _terminate(database_url: str, application_name: str) -> int:
    """End the server's sessions of one pool; how many were ended."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchall()
    return sum(1 for (ended,) in rows if ended)


def _query(client, product_key: str):
    return client.query_product(iot_models.QueryProductRequest(product_key=product_key)).body


def test_quick_reads_go_again_on_a_new_connection(pg_server, client, product_key):
    for _ in range(3):  # the read pool holds a connection now
        assert _query(client, product_key).success
    assert _terminate(pg_server.database_url, "otaplane-reads") >= 1
    for _ in range(3):
        answer = _query(client, product_key)
        assert answer.success, answer
        assert answer.data.product_key == product_key


def test_the_nonce_writer_goes_again_on_a_new_connection(pg_server, client, product_key):
    assert _query(client, product_key).success  # the writer thread holds its connection now
    assert _terminate(pg_server.database_url, "otaplane") >= 1
    for _ in range(3):
        answer = _query(client, product_key)
        assert answer.success, answer
    assert "Traceback" not in pg_server.logs()  # no request failed on the way
