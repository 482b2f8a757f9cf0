"""Clock and the wire's time formats."""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone


def now_ms() -> int:
    return int(time.time() * 1000)


# Memoized: a resource's timestamps are formatted on every query of it (strftime is ~2 us).
@functools.lru_cache(maxsize=4096)
def utc_iso_ms(ms: int) -> str:
    """`2019-11-04T06:21:54.607Z`, the format of every Utc* field."""
    # gmtime, not a datetime: a third of the time, and a package read for the first time
    # formats two of these. Floor division keeps times before 1970 right (-1 ms: 23:59:59.999).
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(ms // 1000)) + f"{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def gmt_rfc(ms: int) -> str:
    """`Wed, 20-Feb-2019 02:16:09 GMT`, the format of module Gmt* fields."""
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%a, %d-%b-%Y %H:%M:%S GMT")


@functools.lru_cache(maxsize=1024)  # every signed request parses one; clients reuse a second's
def parse_utc_seconds(text: str) -> float | None:
    """Seconds since the epoch for `YYYY-MM-DDThh:mm:ssZ` (fractions allowed), else None."""
    value = text.strip()
    if not value.endswith("Z"):
        return None
    try:
        dt = datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return dt.timestamp()
