"""docs/errors.md is generated from the catalogue and must not drift from it."""

import importlib.util
from pathlib import Path

from otaplane import errors
from otaplane.errors import ErrorSpec

ROOT = Path(__file__).parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("errors_doc", ROOT / "scripts" / "errors_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_errors_md_is_up_to_date():
    assert (ROOT / "docs" / "errors.md").read_text() == _generator().render(), \
        "run: python scripts/errors_doc.py"


def test_gateway_and_business_errors_have_the_right_statuses():
    for spec in (v for v in vars(errors).values() if isinstance(v, ErrorSpec)):
        if spec.gateway:
            assert 400 <= spec.http_status < 600, spec.code
        else:
            assert spec.http_status == 200, spec.code
