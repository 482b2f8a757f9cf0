"""otaplane's services in the test process, on a fresh database of a backend: for tests that
force an interleaving (a concurrent request's work run inside another's window)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from otaplane.bootstrap import ensure_admin_key
from otaplane.services.container import Services
from otaplane.settings import Settings


@contextmanager
def fresh_services(backend: str, data_dir: Path, postgres) -> Iterator[Services]:
    """Migrated, with the `default` account and its admin key; closed afterwards."""
    database_url = postgres.create() if backend == "postgresql" else ""
    built = Services.build(Settings(data_dir=data_dir, database_url=database_url))
    built.db.upgrade()
    ensure_admin_key(built)
    try:
        yield built
    finally:
        built.close()
