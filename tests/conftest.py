"""Shared fixtures: a real otaplane server per database backend.

SQLite always runs. PostgreSQL runs too when OTAPLANE_TEST_POSTGRES_URL is set (CI sets it);
if it is set but unreachable, the run stops with an error instead of skipping.
"""

from __future__ import annotations

import os

import pytest

from tests.support.server import PostgresDatabases, ServerProcess
from tests.support.moto import moto_server, s3_blob_url  # noqa: F401  (S3 fixtures for every test)

POSTGRES_URL = os.environ.get("OTAPLANE_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite"] + (["postgresql"] if POSTGRES_URL else [])


@pytest.fixture(scope="session")
def postgres() -> PostgresDatabases | None:
    if not POSTGRES_URL:
        yield None
        return
    databases = PostgresDatabases(POSTGRES_URL)
    try:
        databases.check()
    except Exception as exc:  # fail loudly: CI asked for PostgreSQL
        pytest.exit(f"OTAPLANE_TEST_POSTGRES_URL={POSTGRES_URL} is not reachable: {exc}", returncode=3)
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def make_server(tmp_path_factory, postgres):
    """Factory: start a server (stopped at session end) on the given backend."""
    started: list[ServerProcess] = []

    def start(backend: str = "sqlite", *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        data_dir = tmp_path_factory.mktemp(f"otaplane-{backend}")
        database_url = postgres.create() if backend == "postgresql" else ""
        server = ServerProcess(data_dir, database_url, tuple(args), dict(env or {}))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def server(request, make_server) -> ServerProcess:
    """The shared server of a backend, rate limit off (tests that need one start their own)."""
    return make_server(request.param, "--rate-limit", "0")


@pytest.fixture(scope="session")
def admin_key(server) -> tuple[str, str]:
    return server.create_key("tests-main")
