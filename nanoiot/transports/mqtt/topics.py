"""MQTT topic names, topic filters and wildcard matching (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7).

Pure string functions. NanoIoT is not a broker: it matches a device's subscription filters against the topics it
would send commands on, so these run per SUBSCRIBE, not per message.
"""

from __future__ import annotations

__all__ = ["DEVICE_FILTERS", "GATEWAY_FILTERS", "allowed_filter", "topic_matches", "valid_topic_filter",
           "valid_topic_name"]

#: The filters a device may subscribe with: its own topics, as ThingsBoard's MqttTransportHandler lists them (v1,
#: the v2 short forms with their JSON and protobuf variants, firmware and software updates, provisioning). Anything
#: else — '#', '+/...', another device's topics, ``$SYS`` — is refused (SUBACK 0x80, MQTT 5 0x87 Not authorized).
DEVICE_FILTERS = frozenset({
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/+",
    "v2/a", "v2/a/j", "v2/a/p",
    "v2/a/res/+", "v2/a/res/j/+", "v2/a/res/p/+",
    "v2/r/req/+", "v2/r/req/j/+", "v2/r/req/p/+",
    "v2/r/res/+", "v2/r/res/j/+", "v2/r/res/p/+",
    "v2/fw/response/+", "v2/fw/response/+/chunk/+", "v2/fw/error",
    "v2/sw/response/+", "v2/sw/response/+/chunk/+", "v2/sw/error",
    "/provision/response",
})

#: A gateway's own topics, allowed when devices may act as gateways.
GATEWAY_FILTERS = frozenset({
    "v1/gateway/attributes",
    "v1/gateway/attributes/response",
    "v1/gateway/rpc",
})


def allowed_filter(topic_filter: str, gateways: bool = True) -> bool:
    """Whether a device may subscribe with ``topic_filter``: exactly one of its own topics (a set look-up)."""
    return topic_filter in DEVICE_FILTERS or (gateways and topic_filter in GATEWAY_FILTERS)

_MAX_LENGTH = 0xFFFF


def _encoded_length_ok(text: str) -> bool:
    # Each character takes at least one byte: only long strings need encoding to measure them.
    return len(text) <= _MAX_LENGTH // 4 or len(text.encode("utf-8", "surrogatepass")) <= _MAX_LENGTH


def valid_topic_name(topic: str) -> bool:
    """A topic a PUBLISH may carry: non-empty, no wildcards, no U+0000, at most 65535 UTF-8 bytes."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return False
    return _encoded_length_ok(topic)


def valid_topic_filter(topic_filter: str) -> bool:
    """A filter a SUBSCRIBE may carry: '+' fills a whole level, '#' fills the whole last level (MQTT 4.7.1)."""
    if not topic_filter or "\x00" in topic_filter or not _encoded_length_ok(topic_filter):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return True
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "+":
            continue
        if level == "#":
            if index != last:
                return False
            continue
        if "+" in level or "#" in level:
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a subscription with ``topic_filter`` receives a PUBLISH on ``topic``.

    A filter starting with a wildcard does not match topics starting with '$' (MQTT-4.7.2-1), so '#' does not
    deliver '$SYS/...'. '#' also matches its parent level ('sport/#' matches 'sport'). An invalid filter matches
    nothing.
    """
    if not valid_topic_filter(topic_filter) or not topic:
        return False
    if topic_filter == topic:
        return True
    if topic[0] == "$" and topic_filter[0] in "+#":
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    count = len(topic_levels)
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # valid filters have '#' only as the last level
        if index >= count:
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == count
