"""The baseline for bench/gateway.py: a bare Starlette "hello" endpoint on the serving stack
`otaplane serve` uses (uvicorn, one worker, the same uvicorn.run options as otaplane/cli.py,
its HTTP protocol class included).

    python bench/_hello.py --port 8081
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otaplane.http_protocol import CoalescingHttpToolsProtocol


async def hello(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", hello, methods=["GET"]), Route("/healthz", healthz, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Keep in step with `serve` in src/otaplane/cli.py (its defaults: no access log, level info).
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info", server_header=False,
                http=CoalescingHttpToolsProtocol)


if __name__ == "__main__":
    main()
