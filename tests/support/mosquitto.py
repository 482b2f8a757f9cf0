"""A private Mosquitto for tests that stop the broker or need a password file (the shared one on
127.0.0.1:1883 stays untouched)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.server import free_port


class PrivateMosquitto:
    def __init__(self, directory: Path, users: dict[str, str] | None = None):
        self.directory = directory
        self.users = users
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None

    def start(self) -> "PrivateMosquitto":
        self.directory.mkdir(parents=True, exist_ok=True)
        # As root Mosquitto would switch to the `mosquitto` user, which cannot read a private tmp dir.
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stdout",
                 f"user {getpass.getuser()}"]
        if self.users:
            passwords = self.directory / "passwords"
            passwords.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        log = open(self.directory / "mosquitto.log", "ab")
        self.process = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.directory / 'mosquitto.log').read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
