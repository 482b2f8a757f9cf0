"""Start a real `otaplane serve` process on an ephemeral port, on SQLite or PostgreSQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def otaplane_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "otaplane", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=check,
        timeout=120,
    )


@dataclass
class ServerProcess:
    data_dir: Path
    database_url: str = ""
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    mqtt_port: int = 0  # the embedded device channel (MQTT)
    process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {"OTAPLANE_DATA_DIR": str(self.data_dir), **self.extra_env}
        if self.database_url:
            env["OTAPLANE_DATABASE_URL"] = self.database_url
        return env

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self, timeout_s: float = 60, keep_ports: bool = False) -> "ServerProcess":
        """Start the server; `keep_ports`: on the ports of its previous run (a restart that
        clients, e.g. devices reconnecting, find where they left it)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (keep_ports and self.port and self.mqtt_port):
            self.port = free_port()
            self.mqtt_port = free_port()
            while self.mqtt_port == self.port:
                self.mqtt_port = free_port()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "otaplane", "serve", "--port", str(self.port), "--mqtt-port", str(self.mqtt_port),
             *self.extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"otaplane serve exited early:\n{self.logs()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"otaplane serve did not become healthy:\n{self.logs()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """kill -9: no shutdown code runs, as when a machine dies."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return otaplane_cli(*args, env=self.env, check=check)

    def create_key(self, account: str = "default") -> tuple[str, str]:
        out = self.cli("keys", "create", "--account", account, "--json")
        pair = json.loads(out.stdout)
        return pair["AccessKeyId"], pair["AccessKeySecret"]


class PostgresDatabases:
    """Creates a throwaway database per test session on the given server."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.created: list[str] = []

    def _admin(self):
        import psycopg

        return psycopg.connect(self.base_url, autocommit=True, connect_timeout=5)

    def check(self) -> None:
        with self._admin() as conn:
            conn.execute("SELECT 1")

    def create(self) -> str:
        name = "otaplane_test_" + uuid.uuid4().hex[:12]
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        base, _, _ = self.base_url.rpartition("/")
        return f"{base}/{name}"

    def drop_all(self) -> None:
        with self._admin() as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
