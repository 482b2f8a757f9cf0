"""The wire's time formats against datetime, which the fast paths replace."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from otaplane.timefmt import utc_iso_ms


def _by_datetime(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@pytest.mark.parametrize(("ms", "text"), [
    (0, "1970-01-01T00:00:00.000Z"),
    (-1, "1969-12-31T23:59:59.999Z"),
    (1726651920937, "2024-09-18T09:32:00.937Z"),
    (253402300799999, "9999-12-31T23:59:59.999Z"),
])
def test_utc_iso_ms_known_values(ms, text):
    assert utc_iso_ms.__wrapped__(ms) == text


def test_utc_iso_ms_matches_datetime():
    rng = random.Random(5)
    for ms in [rng.randrange(-10**12, 4 * 10**12) for _ in range(20_000)]:
        assert utc_iso_ms.__wrapped__(ms) == _by_datetime(ms), ms
