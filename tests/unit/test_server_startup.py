"""What the app's lifespan does once the server has started."""

from __future__ import annotations

import gc
import socket

from starlette.testclient import TestClient

from otaplane.server import create_app, prepare
from otaplane.services.container import Services
from otaplane.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_startup_objects_are_left_out_of_later_collections(tmp_path):
    """A full collection walks every tracked object; what startup made is frozen so that the
    pauses of later ones stay small (server._freeze_startup_objects)."""
    gc.unfreeze()
    services = Services.build(Settings(data_dir=tmp_path, host="127.0.0.1", mqtt_port=_free_port()))
    prepare(services)
    try:
        with TestClient(create_app(services)) as client:
            assert client.get("/healthz").status_code == 200
            frozen = gc.get_freeze_count()
            assert frozen > 10_000  # the modules, tables and broker of a started server
            assert len(gc.get_objects()) < frozen  # what a collection still walks
    finally:
        gc.unfreeze()
