"""First start: a default account and an admin key, saved to a 0600 file (never logged)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from otaplane.services.container import Services

log = logging.getLogger("otaplane")

ADMIN_CREDENTIALS_FILE = "admin-credentials.json"


def ensure_admin_key(services: Services) -> None:
    new_key = services.accounts.create_first_admin_key()
    if new_key is None:
        return
    path: Path = services.settings.data_dir / ADMIN_CREDENTIALS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {
                "Account": new_key.account,
                "AccessKeyId": new_key.access_key_id,
                "AccessKeySecret": new_key.access_key_secret,
            },
            handle,
            indent=2,
        )
    log.warning(
        "First start: created account %r with admin AccessKeyId %s; its secret is in %s "
        "(mode 0600). Move it somewhere safe and delete the file.",
        new_key.account,
        new_key.access_key_id,
        path.resolve(),
    )
