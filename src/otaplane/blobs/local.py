"""Local-folder blob store (being written: see helper task)."""

from __future__ import annotations

from pathlib import Path


class LocalBlobStore:
    def __init__(self, root: Path, public_url: str, secret: str):
        self.root = Path(root)
        self.public_url = public_url
        self._secret = secret

    def routes(self) -> list:
        return []
