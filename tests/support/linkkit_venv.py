"""A cached venv with the real Python device SDK, aliyun-iot-linkkit, and a way to run
tests/support/linkkit_driver.py in it.

linkkit 1.2.13 only works with paho-mqtt < 2 (it calls `loop(timeout, 1)`), while the test
process uses paho-mqtt 2, so the SDK gets its own venv. It is built once per versions and kept in
~/.cache/otaplane-test (or $OTAPLANE_TEST_CACHE): built in a temporary folder and renamed into
place, under a file lock, so an interrupted or concurrent build never leaves a broken venv.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REQUIREMENTS = ("aliyun-iot-linkkit==1.2.13", "paho-mqtt<2", "crcmod==1.7")
DRIVER = Path(__file__).with_name("linkkit_driver.py")
CHECK = "import linkkit.linkkit, paho.mqtt; assert paho.mqtt.__version__.startswith('1.'), paho.mqtt.__version__"


def cache_dir() -> Path:
    return Path(os.environ.get("OTAPLANE_TEST_CACHE") or Path.home() / ".cache" / "otaplane-test")


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _works(venv: Path) -> bool:
    python = _python(venv)
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", CHECK], capture_output=True, timeout=60).returncode == 0


def linkkit_python() -> Path:
    """The interpreter of the linkkit venv, built if missing or broken."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], REQUIREMENTS]).encode()).hexdigest()[:12]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"linkkit-venv-{key}"
    if _works(venv):
        return _python(venv)
    with open(root / f"linkkit-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _works(venv):  # built by another session while we waited
            return _python(venv)
        building = root / f"linkkit-venv-{key}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True,
                           timeout=300)
            installed = subprocess.run(
                [str(_python(building)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                 *REQUIREMENTS],
                capture_output=True, text=True, timeout=600,
            )
            if installed.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(REQUIREMENTS)} failed:\n{installed.stdout}\n"
                                   f"{installed.stderr}")
            if not _works(building):
                raise RuntimeError("the linkkit venv was built but does not import linkkit with paho-mqtt 1.x")
            shutil.rmtree(venv, ignore_errors=True)
            building.rename(venv)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    # The venv's own `python` is a symlink to the base interpreter: still valid after the rename.
    return _python(venv)


class Driver:
    """The driver process; `next_event()` returns its `@@` lines as dicts, in order."""

    def __init__(self, python: Path, config: dict):
        self.process = subprocess.Popen(
            [str(python), str(DRIVER), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._done = threading.Event()  # the output has ended
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("@@"):
                self._events.put(json.loads(line[2:]))
        self._done.set()

    def next_event(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() >= deadline or (self.process.poll() is not None and self._done.is_set()):
                    raise AssertionError("the linkkit driver said nothing more; its output:\n"
                                         + "".join(self.output[-80:])) from None
                continue
            if event["event"] == "error":
                raise AssertionError(f"the linkkit driver failed: {event['error']}\n" + "".join(self.output[-80:]))
            return event

    def proceed(self) -> None:
        """Let the driver go past a step that waits for the test."""
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
