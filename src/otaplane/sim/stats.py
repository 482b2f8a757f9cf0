"""The fleet's counters, the summary line and the stats file."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class Stats:
    devices: int = 0
    connected: int = 0  # connected right now
    connects: int = 0  # accepted CONNACKs, reconnects included
    disconnects: int = 0
    connect_refused: int = 0  # CONNACK with a non-zero code
    connect_errors: int = 0  # TCP connect failed, or no CONNACK in time
    first_connect_s: float | None = None  # seconds from start until every device had connected once
    pushes: int = 0  # upgrade messages (push or firmware/get reply with a package) received
    duplicates: int = 0  # a push for a message id this device already handled
    upgrades_started: int = 0
    downloads: int = 0  # completed HTTP downloads
    download_bytes: int = 0
    download_failures: int = 0  # given up (after retries): reported -2
    download_retries: int = 0
    checksum_mismatches: int = 0
    succeeded: int = 0
    failed: int = 0
    in_progress: int = 0
    started_at: float = field(default_factory=time.time)
    _ever_connected: set = field(default_factory=set, repr=False)

    def device_connected(self, index: int) -> None:
        self.connected += 1
        self.connects += 1
        if index not in self._ever_connected:
            self._ever_connected.add(index)
            if len(self._ever_connected) == self.devices:
                self.first_connect_s = time.time() - self.started_at

    @property
    def ever_connected(self) -> int:
        return len(self._ever_connected)

    def snapshot(self, versions: Counter | None = None, per_device: dict[str, str] | None = None) -> dict:
        body = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        body["ever_connected"] = self.ever_connected
        body["elapsed_s"] = round(time.time() - self.started_at, 3)
        if versions is not None:
            body["versions"] = dict(versions)
        if per_device is not None:
            body["per_device"] = per_device
        return body

    def line(self) -> str:
        elapsed = time.time() - self.started_at
        return (f"{elapsed:6.0f}s connected {self.connected}/{self.devices} | pushes {self.pushes} | "
                f"downloads {self.downloads} ({self.download_bytes / 1e6:.1f} MB) | upgrading {self.in_progress} | "
                f"succeeded {self.succeeded} | failed {self.failed}")


def write_json(path: Path, body: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
