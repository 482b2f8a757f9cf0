"""CORS for the blob endpoints otaplane serves (PostObject uploads, presigned GET/HEAD), so a
web console served from another origin can use GenerateOTAUploadURL's form and the download URLs.

Answered as an OSS bucket with one CORS rule answers: the request's Origin echoed back (even to
`*`), the methods of the rule, the headers a preflight asked for, ETag, Content-Length and the
request id exposed, `Vary: Origin`; a preflight the rule does not allow is refused with a 403
AccessForbidden in OSS's XML. Off unless origins are configured (OTAPLANE_CORS_ORIGINS). Only
these endpoints: the signed API on `/` is not for browsers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from otaplane import ids
from otaplane.blobs.oss_signing import OssError

ALLOWED_METHODS = ("GET", "HEAD", "POST")
EXPOSED_HEADERS = ("ETag", "Content-Length", "x-oss-request-id")
PREFLIGHT_MAX_AGE_S = 600
# "*", or scheme://host[:port] in which a `*` stands for any characters, as in OSS's rules.
_ORIGIN = re.compile(r"\*|https?://[^/?#\s]+")


def parse_origins(value: str) -> tuple[str, ...]:
    """The comma-separated setting as a tuple of origins; ValueError for one that cannot be an
    origin (it would never match, silently)."""
    origins = tuple(item.strip().rstrip("/").lower() for item in value.split(",") if item.strip())
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise ValueError(f"CORS origin {origin!r} is not `*` or http(s)://host[:port]")
    return origins


def cors_middleware(origins: tuple[str, ...], error: Callable[[OssError], Response]) -> list[Middleware] | None:
    """What the blob routes are wrapped in (`error`: the store's OSS XML error answer); nothing
    when no origin is allowed."""
    return [Middleware(OssCorsMiddleware, origins=origins, error=error)] if origins else None


class OssCorsMiddleware(CORSMiddleware):
    """Starlette's CORSMiddleware, with OSS's answers where they differ."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...], error: Callable[[OssError], Response]):
        super().__init__(
            app,
            # A pattern even for `*`: Starlette would answer `*`, OSS echoes the Origin.
            allow_origin_regex="|".join(".*".join(map(re.escape, origin.split("*"))) for origin in origins),
            allow_methods=ALLOWED_METHODS,
            allow_headers=("*",),  # a preflight's requested headers are echoed
            expose_headers=EXPOSED_HEADERS,
            max_age=PREFLIGHT_MAX_AGE_S,
        )
        self._error = error

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 200:  # Starlette refuses with a plain-text 400
            return self._error(_not_allowed())
        response.headers["x-oss-request-id"] = ids.oss_request_id()
        return response


def _not_allowed() -> OssError:
    message = ("CORSResponse: This CORS request is not allowed. This is usually because the evalution of Origin, "
               "request method / Access-Control-Request-Method or Access-Control-Request-Headers are not "
               "whitelisted by the resource's CORS spec.")  # OSS's words, its spelling included
    return OssError(403, "AccessForbidden", message)
