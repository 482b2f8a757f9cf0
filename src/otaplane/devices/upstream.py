"""What a device says on its upstream OTA topics, handled the same way whichever channel carries
it: the embedded broker (broker.py) or an external one (external.py).

`handle` parses one message and calls DeviceOtaService; the channel supplies how to run database
work, how to record a device report (a group commit: `Batched(channel, apply_reports)`), how to
serialise one device's state changes, and how to send the firmware/get answer.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from otaplane.blobs.base import BlobStoreUnavailable
from otaplane.devices import messages, topics
from otaplane.services.device_ota import ProgressReport, VersionReport

log = logging.getLogger("otaplane.devices")


@dataclass(frozen=True)
class Handled:
    """What a handled message was (the external channel re-offers pending packages on `inform`)."""

    kind: topics.Upstream
    module: str | None = None
    version: str | None = None
    completed: bool = False


async def handle(
    services: Any,
    run_db: Callable[..., Awaitable[Any]],
    report: Callable[[VersionReport | ProgressReport], Awaitable[bool]],
    turn: Callable[[int], AbstractAsyncContextManager],
    device_id: int,
    product_key: str,
    device_name: str,
    upstream: topics.UpstreamTopic,
    data: bytes,
    reply: Callable[[str, bytes], Awaitable[Any]],
) -> Handled | None:
    """Handle one upstream message of an authenticated device; never raises (but cancellation)."""
    device_ota = services.device_ota
    who = f"{product_key}/{device_name}"
    try:
        if upstream.kind is topics.Upstream.INFORM:
            inform = messages.parse_inform(data)
            async with turn(device_id):
                done = await report(VersionReport(device_id, inform.module, inform.version))
            log.debug("%s runs %s %s%s", who, inform.module or "default", inform.version,
                      " (upgrade complete)" if done else "")
            return Handled(upstream.kind, inform.module, inform.version, bool(done))
        if upstream.kind is topics.Upstream.PROGRESS:
            progress = messages.parse_progress(data)
            async with turn(device_id):
                known = await report(ProgressReport(device_id, progress.module, progress.step, progress.desc))
            if not known:
                log.info("progress %d from %s for module %s, which has no pending package", progress.step, who,
                         progress.module or "default")
            return Handled(upstream.kind, progress.module)
        if upstream.kind is topics.Upstream.FIRMWARE_GET:
            query = messages.parse_firmware_get(data)
            package = await run_db(device_ota.offer, device_id, query.module)
            await reply(topics.firmware_get_reply_topic(product_key, device_name),
                        messages.firmware_get_reply(query.request_id, package))
            return Handled(upstream.kind, query.module)
        if upstream.kind is topics.Upstream.FILE_DOWNLOAD:
            request = messages.parse_block_request(data)
            # One worker-thread hop for the read and the CRC (over the whole block: no loop work).
            await reply(topics.file_download_reply_topic(product_key, device_name),
                        await run_db(_block_reply, device_ota, device_id, request))
            return Handled(upstream.kind)
        if upstream.kind is topics.Upstream.REQUEST:
            query = messages.parse_legacy_request(data)
            if query is None:
                return None  # an answer on the request topic, not a request
            package = await run_db(device_ota.offer, device_id, query.module)
            await reply(topics.legacy_request_topic(product_key, device_name),
                        messages.legacy_request_reply(query.request_id, package))
            return Handled(upstream.kind, query.module)
        log.debug("%s from %s is not handled", upstream.kind.value, who)
    except messages.MalformedMessage as problem:
        log.warning("dropped %s message of %s: %s", upstream.kind.value, who, problem)
    except Exception as problem:
        if not _names_a_missing_row(problem):
            log.exception("%s message of %s failed", upstream.kind.value, who)
            return None
        # Its row went meanwhile (deleted through another process): the channel lets go of it.
        log.warning("dropped %s message of %s: the device no longer exists", upstream.kind.value, who)
        raise DeviceGone(device_id) from None
    return None


class DeviceGone(Exception):
    """A device message named a device id whose row is gone (a foreign key refused the write)."""


def _names_a_missing_row(problem: BaseException) -> bool:
    """A foreign-key refusal (SQLAlchemy's IntegrityError, which store.prepared raises too)."""
    if not isinstance(problem, IntegrityError):
        return False
    if isinstance(problem.orig, sqlite3.IntegrityError):
        return "FOREIGN KEY" in str(problem.orig)
    return getattr(problem.orig, "sqlstate", None) == "23503"  # PostgreSQL: foreign_key_violation


def _block_reply(device_ota: Any, device_id: int, request: messages.BlockRequest) -> bytes:
    """The download_reply to a block request: the block, or a header-only refusal."""
    size = min(request.size, messages.MAX_BLOCK_BYTES)
    try:
        found = device_ota.file_block(device_id, request.stream_id, request.file_id, request.offset, size)
    except BlobStoreUnavailable as problem:  # S3 down: the device asks again, as after a lost reply
        log.warning("block of file %s for device %s not read: %s", request.file_id, device_id, problem)
        return messages.block_reply({"code": 503, "message": "the package store is unavailable; ask again later",
                                     "data": {"fileToken": request.file_token}})
    if found is None:
        return messages.block_reply({"code": 404, "message": "no such file for this device",
                                     "data": {"fileToken": request.file_token}})
    length, data = found
    if request.offset >= length > 0:
        return messages.block_reply({"code": 400, "message": f"offset {request.offset} is past the end ({length})",
                                     "data": {"fileToken": request.file_token, "fileLength": length}})
    return messages.block_reply({"code": 200, "data": {
        "bSize": len(data), "bOffset": request.offset, "fileLength": length, "fileToken": request.file_token}}, data)
