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


@pytest.mark.parametrize("setting", [{"port": 70000}, {"port": 0}, {"port": -1}, {"mqtt_port": 65536},
                                     {"mqtt_port": -5}, {"rate_limit": -3}, {"rate_limit_burst": -1}])
def test_ports_and_rates_out_of_range_are_refused(setting):
    """--port 70000 started a server on port 4464 (getaddrinfo takes the port modulo 65536) whose
    presigned URLs said 70000; --rate-limit -3 turned the limit off (found by a CLI audit)."""
    with pytest.raises(ValidationError):
        Settings(**setting)


def test_ports_and_rates_in_range_are_taken():
    settings = Settings(port=65535, mqtt_port=0, rate_limit=0, rate_limit_burst=0)
    assert (settings.port, settings.mqtt_port, settings.rate_limit) == (65535, 0, 0)
