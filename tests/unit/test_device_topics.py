"""Topic names and the device ACL: a device reaches only its own topics."""

from __future__ import annotations

import pytest

from otaplane.devices import topics
from otaplane.devices.topics import Upstream

PK, DN = "a1PK", "dev1"


@pytest.mark.parametrize("topic", [
    f"/ota/device/inform/{PK}/{DN}",
    f"/ota/device/progress/{PK}/{DN}",
    f"/ota/device/request/{PK}/{DN}",
    f"/sys/{PK}/{DN}/thing/ota/firmware/get",
    f"/sys/{PK}/{DN}/thing/event/property/post",
    f"/ext/ntp/{PK}/{DN}/request",
    f"/{PK}/{DN}/user/update",
])
def test_a_device_may_publish_its_own_topics(topic):
    assert topics.may_publish(topic, PK, DN)


@pytest.mark.parametrize("topic", [
    f"/ota/device/inform/{PK}/other",
    f"/ota/device/progress/otherPK/{DN}",
    f"/ota/device/inform/{PK}/{DN}/extra",
    f"/ota/device/inform/{PK}",
    f"/sys/{PK}/other/thing/ota/firmware/get",
    f"/sys/{PK}/{DN}",
    f"ota/device/inform/{PK}/{DN}",
    "/broadcast/all",
    f"/ota/device/inform/{PK}/+",
    "",
])
def test_a_device_may_not_publish_other_topics(topic):
    assert not topics.may_publish(topic, PK, DN)


@pytest.mark.parametrize("topic_filter", [
    f"/ota/device/upgrade/{PK}/{DN}",
    f"/ota/device/+/{PK}/{DN}",
    f"/sys/{PK}/{DN}/#",
    f"/sys/{PK}/{DN}/thing/+/firmware/get_reply",
    f"/{PK}/{DN}/user/#",
])
def test_a_device_may_subscribe_filters_within_its_namespace(topic_filter):
    assert topics.may_subscribe(topic_filter, PK, DN)


@pytest.mark.parametrize("topic_filter", [
    "#",
    "/#",
    "/ota/device/#",
    f"/ota/device/upgrade/{PK}/+",
    f"/ota/device/upgrade/+/{DN}",
    f"/ota/device/#/{PK}/{DN}",
    f"/sys/{PK}/+/thing/ota/firmware/get_reply",
    "/sys/+/+/#",
    f"/ota/device/upgrade/{PK}/other",
])
def test_a_device_may_not_subscribe_to_others(topic_filter):
    assert not topics.may_subscribe(topic_filter, PK, DN)


def test_parse_upstream():
    assert topics.parse_upstream(f"/ota/device/inform/{PK}/{DN}") == topics.UpstreamTopic(Upstream.INFORM, PK, DN)
    assert topics.parse_upstream(f"/ota/device/progress/{PK}/{DN}").kind is Upstream.PROGRESS
    assert topics.parse_upstream(f"/ota/device/request/{PK}/{DN}").kind is Upstream.REQUEST
    get = topics.parse_upstream(f"/sys/{PK}/{DN}/thing/ota/firmware/get")
    assert get == topics.UpstreamTopic(Upstream.FIRMWARE_GET, PK, DN)
    download = topics.parse_upstream(f"/sys/{PK}/{DN}/thing/file/download")
    assert download == topics.UpstreamTopic(Upstream.FILE_DOWNLOAD, PK, DN)
    for other in (f"/ota/device/upgrade/{PK}/{DN}", f"/sys/{PK}/{DN}/thing/ota/firmware/get_reply",
                  f"/sys/{PK}/{DN}/thing/file/download_reply", f"/sys/{PK}/{DN}/thing/file/download/x",
                  f"/sys/{PK}/{DN}/thing/event/property/post", "/x"):
        assert topics.parse_upstream(other) is None


def test_server_subscriptions():
    assert topics.server_subscriptions(PK, DN) == (
        f"/ota/device/upgrade/{PK}/{DN}", f"/sys/{PK}/{DN}/thing/ota/firmware/get_reply",
        f"/sys/{PK}/{DN}/thing/file/download_reply")
