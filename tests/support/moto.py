"""A real S3-protocol server for tests: moto's standalone server as a subprocess.

Loaded as a pytest plugin from tests/conftest.py. The `s3_blob_url` fixture answers
s3://BUCKET?endpoint_url=http://127.0.0.1:PORT&region=us-east-1 with the bucket already created.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from tests.support.server import free_port

BUCKET = "otaplane-test"
REGION = "us-east-1"


class MotoServer:
    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30, port: int = 0) -> "MotoServer":
        """Start on `port`, or on a free one; its state (buckets, objects) starts empty."""
        self.port = port or free_port()
        log = open(self.log_path, "ab")
        # `python -m moto.server` is the `moto_server` entry point, without depending on PATH.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited early:\n{self.log_path.read_text(errors='replace')}")
            try:
                httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1)  # any answer means it is up
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {timeout_s}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as env:
        # moto accepts any credentials; the blob store reads them from the standard AWS env chain.
        # Set in os.environ so otaplane server subprocesses started by tests inherit them too.
        env.setenv("AWS_ACCESS_KEY_ID", "otaplane-test-key")
        env.setenv("AWS_SECRET_ACCESS_KEY", "otaplane-test-secret")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_blob_url(moto_server: MotoServer) -> str:
    client = boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}?endpoint_url={moto_server.endpoint_url}&region={REGION}"
