"""Encryption at rest for secrets (AccessKey, product and device secrets).

The master key comes from OTAPLANE_MASTER_KEY or from `<data-dir>/master.key` (created 0600 on
first use). Replicas sharing one database must share the same master key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from functools import lru_cache
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

MASTER_KEY_FILE = "master.key"


class SecretBox:
    def __init__(self, key: bytes):
        self._fernet = Fernet(key)
        self._key = key

    def derive(self, label: str) -> str:
        """A stable secret for one purpose (e.g. signing blob URLs), the same on every replica."""
        digest = hmac.new(self._key, label.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    @classmethod
    def from_settings(cls, master_key: str, data_dir: Path) -> "SecretBox":
        if master_key:
            return cls(master_key.encode())
        return cls(load_or_create_key_file(data_dir / MASTER_KEY_FILE))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        return _decrypt_cached(self._fernet, token)


@lru_cache(maxsize=4096)
def _decrypt_cached(fernet: Fernet, token: str) -> str:
    # Decryption is on every signed request's path; a token's plaintext never changes.
    try:
        return fernet.decrypt(token.encode()).decode()
    except InvalidToken:
        raise RuntimeError(
            "cannot decrypt a stored secret: the master key differs from the one it was stored with"
        ) from None


def load_or_create_key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting together never both write a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key
