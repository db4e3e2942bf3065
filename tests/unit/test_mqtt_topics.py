"""Topic names, topic filters and wildcard matching, checked against the examples of MQTT 3.1.1 / 5 section 4.7."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoiot.transports.mqtt.topics import topic_matches, valid_topic_filter, valid_topic_name

# (filter, topic, matches): the examples of MQTT 3.1.1 4.7.1 / 4.7.2 and MQTT 5 4.7.1 / 4.7.2, plus our own topics.
MATCHING = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/tennis/player1/ranking", True),
    ("+/tennis/#", "sport/tennis", True),
    # 4.7.2 topics beginning with $
    ("#", "$SYS/broker/clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("+", "$SYS", False),
    # 4.7.3 case sensitivity and exact levels
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("/finance", "finance", False),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    # the command topics NanoIoT checks subscriptions against
    ("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/0", True),
    ("v1/devices/me/rpc/#", "v1/devices/me/rpc/request/0", True),
    ("v1/devices/me/rpc/response/+", "v1/devices/me/rpc/request/0", False),
    ("v2/r/req/+", "v2/r/req/0", True),
    ("v2/r/req/+", "v2/r/req/j/0", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHING)
def test_a_filter_matches_a_topic_exactly_as_the_mqtt_specification_examples_say(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter", [
    "sport/tennis/player1/#", "sport/#", "#", "+", "+/+", "/+", "+/tennis/#", "sport/+/player1",
    "sport/tennis/+", "$SYS/#", "/", "a//b", " ", "v1/devices/me/rpc/request/+", "ünïcödé/+",
])
def test_a_well_formed_topic_filter_is_valid(topic_filter):
    assert valid_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", [
    "", "sport/tennis#", "sport/tennis/#/ranking", "sport+", "sport/+tennis", "#/a", "a/#/", "++", "##",
    "a\x00b",
])
def test_a_malformed_topic_filter_is_invalid(topic_filter):
    assert not valid_topic_filter(topic_filter)


def test_an_invalid_filter_matches_nothing():
    assert not topic_matches("sport/tennis#", "sport/tennis#")
    assert not topic_matches("a/#/b", "a/x/b")


def test_an_empty_topic_is_matched_by_no_filter():
    assert not topic_matches("#", "")


@pytest.mark.parametrize("topic", ["a", "/", "a/b/c", " ", "$SYS/uptime", "ünïcödé", "a" * 65535])
def test_a_non_empty_topic_without_wildcards_or_nul_is_a_valid_topic_name(topic):
    assert valid_topic_name(topic)


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "+", "#", "a\x00", "a" * 65536, "é" * 32768])
def test_an_empty_wildcarded_nul_or_oversized_topic_name_is_invalid(topic):
    assert not valid_topic_name(topic)


def test_the_length_limit_counts_utf8_bytes_not_characters():
    assert valid_topic_name("é" * 32767 + "a")  # 65535 bytes
    assert not valid_topic_filter("é" * 32768)  # 65536 bytes


_level = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00/+#"), max_size=5)
_topic = st.lists(_level, min_size=1, max_size=6).map("/".join).filter(bool)


@given(_topic)
def test_every_topic_name_matches_itself_as_a_filter(topic):
    assert valid_topic_name(topic)
    assert topic_matches(topic, topic)


@given(_topic)
def test_hash_matches_every_topic_except_dollar_topics(topic):
    assert topic_matches("#", topic) is (not topic.startswith("$"))


@given(_topic, st.data())
def test_replacing_any_non_first_levels_with_plus_still_matches(topic, data):
    levels = topic.split("/")
    wild = [level if index == 0 or not data.draw(st.booleans()) else "+" for index, level in enumerate(levels)]
    assert topic_matches("/".join(wild), topic)
    assert topic_matches("/".join(levels[:1] + ["#"]), topic)
