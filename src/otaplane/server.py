"""Builds the ASGI app: RPC gateway on `/`, health check, background housekeeping."""

from __future__ import annotations

import contextlib
import logging

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otaplane.bootstrap import ensure_admin_key
from otaplane.openapi.gateway import Gateway
from otaplane.services.container import Services
from otaplane.store import nonces
from otaplane.timefmt import now_ms

log = logging.getLogger("otaplane")

HOUSEKEEPING_INTERVAL_S = 60


def prepare(services: Services) -> None:
    """Everything that must be true before the first request: schema, storage, first key."""
    services.db.upgrade()
    check_storage = getattr(services.blobs, "check", None)
    if check_storage is not None:  # fail at start, not at the first upload, when S3 is unreachable
        check_storage()
    ensure_admin_key(services)


def _tidy(services: Services) -> None:
    with services.db.begin() as conn:
        nonces.purge_expired(conn, now_ms())
    services.firmware.collect_abandoned_uploads()


async def _housekeeping(services: Services) -> None:
    while True:
        await anyio.sleep(HOUSEKEEPING_INTERVAL_S)
        try:
            await anyio.to_thread.run_sync(_tidy, services)
        except Exception:  # keep going: a failed purge only delays cleanup
            log.exception("housekeeping failed")


def create_app(services: Services) -> Starlette:
    gateway = Gateway(services)

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_housekeeping, services)
            yield
            tasks.cancel_scope.cancel()
        services.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        # The local blob store serves its own upload and download URLs; S3 needs none.
        *getattr(services.blobs, "routes", lambda: [])(),
        Route("/", gateway.handle, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
