"""Parameter declarations shared by several resources."""

from otaplane import errors
from otaplane.openapi.params import Int, Param, Str

PRODUCT_KEY = Param("ProductKey", Str(max_len=32), required=True)
MAX_PAGE = 1_000_000  # the last CurrentPage asked for: its offset stays within a BIGINT


def paging(max_page_size: int, default_size: int | None = None) -> tuple[Param, Param]:
    """CurrentPage/PageSize; required unless a default page size is given."""
    required = default_size is None
    return (
        Param("CurrentPage", Int(min=1, max=MAX_PAGE), required=required, default=1,
              invalid_error=errors.InvalidPageParams),
        Param("PageSize", Int(min=1, max=max_page_size), required=required, default=default_size,
              invalid_error=errors.InvalidPageParams),
    )
