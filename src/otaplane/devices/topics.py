"""The device OTA topics and the access rule: a device reaches only its own topics.

Pure functions on topic strings; the broker asks them at every PUBLISH and SUBSCRIBE.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


def upgrade_topic(product_key: str, device_name: str) -> str:
    return f"/ota/device/upgrade/{product_key}/{device_name}"


def legacy_request_topic(product_key: str, device_name: str) -> str:
    """Both ways: iotkit 2.x/3.x asks for its package here, and reads the answer here too."""
    return f"/ota/device/request/{product_key}/{device_name}"


def firmware_get_reply_topic(product_key: str, device_name: str) -> str:
    return f"/sys/{product_key}/{device_name}/thing/ota/firmware/get_reply"


def file_download_reply_topic(product_key: str, device_name: str) -> str:
    return f"/sys/{product_key}/{device_name}/thing/file/download_reply"


def server_subscriptions(product_key: str, device_name: str) -> tuple[str, ...]:
    """What every device is subscribed to from CONNACK on, without sending SUBSCRIBE (`_ss=1`)."""
    return (upgrade_topic(product_key, device_name), firmware_get_reply_topic(product_key, device_name),
            file_download_reply_topic(product_key, device_name))


def downstream_topics(product_key: str, device_name: str) -> tuple[str, ...]:
    """Every topic otaplane sends a device messages on: its server subscriptions, and the legacy
    request topic, to which iotkit subscribes itself and where it reads the answer to its pull."""
    return (*server_subscriptions(product_key, device_name), legacy_request_topic(product_key, device_name))


class Upstream(Enum):
    INFORM = "inform"  # /ota/device/inform/{pk}/{dn}: version report
    PROGRESS = "progress"  # /ota/device/progress/{pk}/{dn}
    FIRMWARE_GET = "firmware_get"  # /sys/{pk}/{dn}/thing/ota/firmware/get
    REQUEST = "request"  # /ota/device/request/{pk}/{dn}: legacy pull (iotkit 2.x/3.x)
    FILE_DOWNLOAD = "file_download"  # /sys/{pk}/{dn}/thing/file/download: a block (DownloadProtocol MQTT)


@dataclass(frozen=True)
class UpstreamTopic:
    kind: Upstream
    product_key: str
    device_name: str


_OTA_KINDS = {"inform": Upstream.INFORM, "progress": Upstream.PROGRESS, "request": Upstream.REQUEST}


def parse_upstream(topic: str) -> UpstreamTopic | None:
    """The OTA message a device sent, or None for any other topic."""
    levels = topic.split("/")
    if len(levels) == 6 and levels[:3] == ["", "ota", "device"] and levels[3] in _OTA_KINDS:
        return UpstreamTopic(_OTA_KINDS[levels[3]], levels[4], levels[5])
    if len(levels) == 8 and levels[:2] == ["", "sys"] and levels[4:] == ["thing", "ota", "firmware", "get"]:
        return UpstreamTopic(Upstream.FIRMWARE_GET, levels[2], levels[3])
    if len(levels) == 7 and levels[:2] == ["", "sys"] and levels[4:] == ["thing", "file", "download"]:
        return UpstreamTopic(Upstream.FILE_DOWNLOAD, levels[2], levels[3])
    return None


# A device's own namespace, as level templates after the leading "/":
#   PK / DN: the device's own keys; "*": any one level; `exact`: no more levels may follow.
_PK, _DN, _ANY = object(), object(), object()
_OWN_NAMESPACES: tuple[tuple[tuple, bool], ...] = (
    (("ota", "device", _ANY, _PK, _DN), True),  # /ota/device/{inform,progress,upgrade,request}/pk/dn
    (("sys", _PK, _DN), False),  # /sys/pk/dn/...
    (("ext", _ANY, _PK, _DN), False),  # /ext/ntp/pk/dn/..., /ext/error/pk/dn
    ((_PK, _DN), False),  # custom topics /pk/dn/user/...
)


def _within(levels: list[str], product_key: str, device_name: str) -> bool:
    if not levels or levels[0] != "":
        return False
    rest = levels[1:]
    for template, exact in _OWN_NAMESPACES:
        if len(rest) < len(template) or (exact and len(rest) != len(template)):
            continue
        if not exact and len(rest) == len(template):
            continue  # `/sys/pk/dn` itself is no topic; something must follow
        ok = True
        for level, expected in zip(rest, template):
            if expected is _ANY:
                # "+" stays inside the namespace; "#" would reach other devices' topics.
                ok = level != "#" and level != ""
            elif expected is _PK:
                ok = level == product_key
            elif expected is _DN:
                ok = level == device_name
            else:
                ok = level == expected
            if not ok:
                break
        if ok:
            return True
    return False


def may_publish(topic: str, product_key: str, device_name: str) -> bool:
    if "+" in topic or "#" in topic:
        return False
    return _within(topic.split("/"), product_key, device_name)


def may_subscribe(topic_filter: str, product_key: str, device_name: str) -> bool:
    """A filter is allowed when every topic it can match is the device's own."""
    return _within(topic_filter.split("/"), product_key, device_name)
