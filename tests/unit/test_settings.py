"""Settings that cannot work are refused when the process starts, not found out by devices."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from otaplane.settings import Settings


@pytest.mark.parametrize("ttl", [0, -1, -86400])
def test_a_download_url_lifetime_of_no_time_is_refused(ttl, monkeypatch):
    """OTAPLANE_DOWNLOAD_URL_TTL_SECONDS=0 (or less) started a server whose every presigned
    URL, in QueryOTAFirmware and in device pushes, had expired when it was made (found by an
    audit)."""
    with pytest.raises(ValidationError):
        Settings(download_url_ttl_seconds=ttl)
    monkeypatch.setenv("OTAPLANE_DOWNLOAD_URL_TTL_SECONDS", str(ttl))
    with pytest.raises(ValidationError):
        Settings()


def test_a_download_url_lifetime_of_a_second_or_more_is_taken(monkeypatch):
    monkeypatch.setenv("OTAPLANE_DOWNLOAD_URL_TTL_SECONDS", "1")
    assert Settings().download_url_ttl_seconds == 1
    assert Settings(download_url_ttl_seconds=7 * 24 * 3600).download_url_ttl_seconds == 7 * 24 * 3600
