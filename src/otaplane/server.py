"""Builds the ASGI app: RPC gateway on `/`, health check, background housekeeping, and the
device channel (the embedded MQTT broker), which runs in the app's lifespan, on the same loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from otaplane.bootstrap import ensure_admin_key
from otaplane.devices.http_auth import make_endpoints as make_mqtt_endpoints
from otaplane.openapi.gateway import Gateway
from otaplane.services.container import Services
from otaplane.store import nonces
from otaplane.store.disconnects import log_loop_failure
from otaplane.store.nonce_file import NonceFile
from otaplane.timefmt import now_ms

log = logging.getLogger("otaplane")

HOUSEKEEPING_INTERVAL_S = 60
NONCE_PURGE_INTERVAL_S = 1


def prepare(services: Services) -> None:
    """Everything that must be true before the first request: schema, storage, first key."""
    services.db.upgrade()
    check_storage = getattr(services.blobs, "check", None)
    if check_storage is not None:  # fail at start, not at the first upload, when S3 is unreachable
        check_storage()
    ensure_admin_key(services)
    if isinstance(services.nonces, NonceFile):  # nonces recorded in the database before it stay used
        with services.db.begin() as conn:
            services.nonces.import_rows(nonces.take_all_in_use(conn, now_ms()))


def _freeze_startup_objects() -> None:
    """Leave what startup made (modules, tables, the broker...: ~130,000 objects) out of every
    later garbage collection. A full collection walks every tracked object, and the caches
    that fill while serving trigger one now and then: 35-80 ms with the event loop stopped, the
    p99 of a random-package QueryOTAFirmware. Only the objects made since are walked now."""
    gc.collect()
    gc.freeze()


def _tidy(services: Services) -> None:
    if not isinstance(services.nonces, NonceFile):  # the file has a loop of its own (below)
        services.nonces.purge_expired(now_ms())
    services.firmware.collect_abandoned_uploads()
    sweep_incoming = getattr(services.blobs, "sweep_incoming", None)
    if sweep_incoming is not None:  # the local store: uploads of a process that died midway
        sweep_incoming()


async def _housekeeping(services: Services) -> None:
    while True:
        await anyio.sleep(HOUSEKEEPING_INTERVAL_S)
        try:
            await anyio.to_thread.run_sync(_tidy, services)
        except Exception:  # keep going: a failed purge only delays cleanup
            log_loop_failure(log, "housekeeping")


async def _purge_nonce_file(nonce_file: NonceFile) -> None:
    """A slice of the nonce file a second (store.nonce_file.PURGE_SCAN records, a few ms of a
    worker thread holding the GIL): the whole file is read every few minutes, and no request
    waits long behind one slice."""
    while True:
        await anyio.sleep(NONCE_PURGE_INTERVAL_S)
        try:
            await anyio.to_thread.run_sync(nonce_file.purge_expired, now_ms())
        except Exception:  # keep going: a failed purge only delays cleanup
            log_loop_failure(log, "nonce purge")


class _DispatchLoop:
    """Runs the job dispatcher every dispatch_interval_seconds, sooner when woken by new work
    (a job created, a task confirmed, a dynamic job matched a device)."""

    def __init__(self, services: Services):
        self.services = services
        self.interval = max(0.01, services.settings.dispatch_interval_seconds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def wake(self) -> None:  # any thread
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.services.jobs.add_listener(self.wake)
        self.services.device_ota.add_job_listener(self.wake)
        dispatcher = self.services.dispatcher
        while True:
            try:
                await anyio.to_thread.run_sync(dispatcher.tick)
            except Exception:  # keep going: the next tick retries from what the database says
                log_loop_failure(log, "dispatcher tick")
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake.clear()


async def _start_device_channel(services: Services):
    settings = services.settings
    if settings.mqtt_url:  # devices connect to an external broker; otaplane is its client
        from otaplane.devices.external import ExternalChannel

        external = ExternalChannel(services, settings.mqtt_url, settings.mqtt_share_group,
                                   settings.mqtt_connect_timeout_seconds)
        await external.start()
        return external
    from otaplane.devices.broker import DeviceChannel

    channel = DeviceChannel(services, settings.resolved_mqtt_host(), settings.mqtt_port,
                            settings.mqtt_certfile, settings.mqtt_keyfile, settings.mqtt_connect_timeout_seconds)
    await channel.start()
    return channel


def create_app(services: Services) -> ASGIApp:
    gateway = Gateway(services)

    async def healthz(_request: Request) -> JSONResponse:
        dispatcher = services.dispatcher  # counters for operators and bench/rollout.py
        return JSONResponse({"status": "ok", "dispatcher": {"tasks_dispatched": dispatcher.dispatched_total,
                                                            "cpu_seconds": round(dispatcher.cpu_seconds, 4)}})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        channel = await _start_device_channel(services)
        app.state.device_channel = channel
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_housekeeping, services)
                if isinstance(services.nonces, NonceFile):
                    tasks.start_soon(_purge_nonce_file, services.nonces)
                tasks.start_soon(_DispatchLoop(services).run)
                _freeze_startup_objects()
                yield
                tasks.cancel_scope.cancel()
        finally:
            if channel is not None:
                await channel.stop()
            gateway.close()
            services.close()

    mqtt_auth, mqtt_acl = make_mqtt_endpoints(services)
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        # For an external MQTT broker (EMQX HTTP authn/authz, mosquitto-go-auth): devices/http_auth.py
        Route("/mqtt/auth", mqtt_auth, methods=["POST"]),
        Route("/mqtt/acl", mqtt_acl, methods=["POST"]),
        # The local blob store serves its own upload and download URLs; S3 needs none.
        *getattr(services.blobs, "routes", list)(),
        Route("/", gateway, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    ]
    # `/` skips Starlette's routing on the way in (the Route above still answers 405 for the rest).
    return gateway.in_front_of(Starlette(routes=routes, lifespan=lifespan))
