"""docs/errors.md must list every code of the catalogue (one source of truth, checked)."""

from pathlib import Path

from otaplane import errors
from otaplane.errors import ErrorSpec

DOC = (Path(__file__).parents[2] / "docs" / "errors.md").read_text()


def test_every_catalogue_code_is_documented():
    codes = {v.code.replace("{name}", "&lt;Name&gt;") for v in vars(errors).values() if isinstance(v, ErrorSpec)}
    missing = sorted(code for code in codes if f"`{code}`" not in DOC)
    assert not missing, f"add these codes to docs/errors.md: {missing}"


def test_gateway_and_business_errors_have_the_right_statuses():
    for spec in (v for v in vars(errors).values() if isinstance(v, ErrorSpec)):
        if spec.gateway:
            assert 400 <= spec.http_status < 600, spec.code
        else:
            assert spec.http_status == 200, spec.code
