"""The gateway's query parser answers exactly what urllib's parse_qsl(keep_blank_values=True) does."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest

from otaplane.openapi.gateway import parse_query

CASES = [
    "",
    "&",
    "a",
    "a=",
    "=b",
    "=",
    "a=1&b=2&a=3",
    "a=1&&b=2&",
    "a=b=c",
    "a+b=c+d",
    "a%20b=c%2Bd%3D",
    "x=%E4%B8%AD%E6%96%87&y=%ff%fe",
    "x=%zz&y=%4&z=%",
    "Timestamp=2024-01-01T00%3A00%3A00Z&Signature=abc%2Bdef%2F%3D",
    "k=%00&n%00=v",
    "plus=a+%2B+b",
    "mixed=%aF%Af%af%AF&edge=%7f%7F%80&end=%4&%=%%",
    "utf8=%C3%A9%3A&half=%C3&name%3Dx=1",
    urlencode({"Action": "QueryProduct", "ProductKey": "a1B", "Name": "ü ß/?&=+"}),
]


@pytest.mark.parametrize("text", CASES)
def test_parse_query_matches_parse_qsl(text):
    assert parse_query(text) == parse_qsl(text, keep_blank_values=True)
