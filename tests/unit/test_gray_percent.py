"""otaplane.services.jobs.parse_gray_percent: GrayPercent is a plain decimal string such as
"33.33", above 0 and at most 100, with at most three decimals (openapi.md §5)."""

from __future__ import annotations

import pytest

from otaplane.errors import ApiError
from otaplane.services.jobs import gray_count, parse_gray_percent


@pytest.mark.parametrize("raw", ["1", "50", "100", "33.33", "0.001", "99.999", "100.000", "07", "12.5"])
def test_plain_decimals_are_accepted_as_given(raw):
    assert parse_gray_percent(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        # Decimal() reads all of these; the platform's format is digits, a point and digits.
        "1e1", "1E1", "5e-1", " 5", "5 ", "+5", "5.", ".5", "inf", "Infinity", "nan", "NaN", "sNaN",
        "0x10", "1_0", "٥",  # Arabic-Indic five
        "５",  # full-width five
        "", "abc", "5,5", "--5", "5.5.5",
    ],
)
def test_other_spellings_are_invalid(raw):
    with pytest.raises(ApiError) as info:
        parse_gray_percent(raw)
    assert info.value.code == "InvalidParameter"
    assert info.value.message.startswith("The specified parameter GrayPercent is not valid: ")


@pytest.mark.parametrize("raw", ["0", "0.000", "-5", "100.001", "100.5", "12.3456", "33.3330"])
def test_out_of_range_or_too_precise_is_invalid(raw):
    with pytest.raises(ApiError) as info:
        parse_gray_percent(raw)
    assert info.value.code == "InvalidParameter"


def test_count_rounds_down_but_takes_at_least_one_device():
    assert gray_count(100, "33.33") == 33
    assert gray_count(3, "10") == 1
    assert gray_count(0, "50") == 0
