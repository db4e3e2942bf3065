"""The cluster bus's pure parts, without a database: URL conversion, checks, queueing and payload decoding.

The bus runs on ``twisted.internet.task.Clock`` here; nothing connects (the integration tests in
tests/integration/test_cluster_notify.py do that on a real PostgreSQL).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
from twisted.internet.task import Clock

from nanoiot.cluster.notify import (
    APPLICATION_NAME,
    NotifyBus,
    _utf8_length_over,
    check_channel,
    connect_kwargs,
)

URL = "postgresql+psycopg2://nanoiot:s3cr%40t@db.example:6543/iot"

Notify = namedtuple("Notify", "pid channel payload")


def test_connect_kwargs_from_a_sqlalchemy_url() -> None:
    kwargs = connect_kwargs(URL + "?sslmode=require")
    assert kwargs["host"] == "db.example"
    assert kwargs["port"] == 6543
    assert kwargs["user"] == "nanoiot"
    assert kwargs["password"] == "s3cr@t"
    assert kwargs["dbname"] == "iot"
    assert kwargs["sslmode"] == "require"
    assert kwargs["keepalives"] == "1"  # idle listening connections must notice a vanished server


def test_connect_kwargs_accepts_a_plain_postgresql_url_and_lets_the_url_override_defaults() -> None:
    kwargs = connect_kwargs("postgresql://me@localhost/db?keepalives_idle=5")
    assert (kwargs["user"], kwargs["host"], kwargs["dbname"]) == ("me", "localhost", "db")
    assert "password" not in kwargs and "port" not in kwargs
    assert kwargs["keepalives_idle"] == "5"


def test_connect_kwargs_refuses_other_databases() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        connect_kwargs("sqlite:///nanoiot.db")


@pytest.mark.parametrize("channel", ["x", "nanoiot:node-1:8080", "NanoIoT:Node-1", 'we"ird; name', "é" * 31,
                                     "c" * 63])
def test_valid_channels(channel: str) -> None:
    check_channel(channel)


@pytest.mark.parametrize("channel", ["", "c" * 64, "é" * 32, "nul\x00", "surrogate\ud800", None, 42])
def test_invalid_channels(channel: Any) -> None:
    with pytest.raises(ValueError):
        check_channel(channel)


def test_payload_size_is_counted_in_utf8_bytes() -> None:
    assert not _utf8_length_over("x" * 100, 100)
    assert _utf8_length_over("x" * 101, 100)
    assert not _utf8_length_over("é" * 50, 100)
    assert _utf8_length_over("é" * 51, 100)
    assert _utf8_length_over("😀" * 26, 100)
    assert not _utf8_length_over("😀" * 25, 100)
    assert not _utf8_length_over("", 0)
    assert _utf8_length_over("x", 0)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError):
        NotifyBus(URL, Clock(), max_payload=8000)
    with pytest.raises(ValueError):
        NotifyBus(URL, Clock(), max_queued=0)
    with pytest.raises(ValueError):
        NotifyBus(URL, Clock(), reconnect_delay=0)


def test_application_name() -> None:
    assert NotifyBus(URL, Clock()).application_name == APPLICATION_NAME
    assert NotifyBus(URL, Clock(), name="node-1").application_name == f"{APPLICATION_NAME}:node-1"


def test_a_bus_not_started_queues_up_to_max_queued() -> None:
    clock = Clock()
    bus = NotifyBus(URL, clock, max_queued=3)
    assert [bus.notify("x", str(i)) for i in range(3)] == [True, True, True]
    assert not bus.notify("x", "3")
    assert bus.notify_many([("x", "4"), ("x", "5")]) == 0
    assert bus.dropped == 3
    assert not bus.connected
    assert not bus.flushed().called  # three are waiting for start()
    assert clock.getDelayedCalls() == []  # nothing scheduled while there is no connection


def test_notify_refuses_what_postgresql_would_refuse() -> None:
    bus = NotifyBus(URL, Clock())
    with pytest.raises(ValueError):
        bus.notify("", "payload")
    with pytest.raises(ValueError):
        bus.notify("c" * 64, "payload")
    with pytest.raises(ValueError):
        bus.notify("x", "nul\x00")
    assert bus.flushed().called  # nothing was queued


def test_stopped_bus_refuses_notifications_and_fails_waiters() -> None:
    bus = NotifyBus(URL, Clock())
    bus.notify("x", "queued")
    flushed = bus.flushed()
    listening = bus.listen("x", lambda payload: None)
    bus.stop()
    assert not bus.notify("x", "after stop")
    for d in (flushed, listening):
        failures: list[Any] = []
        d.addErrback(failures.append)
        assert len(failures) == 1


def test_decoding_of_wire_payloads_and_order_behind_a_row() -> None:
    """Small payloads are delivered at once, unless a row is pending on their channel; unknown forms are dropped."""
    bus = NotifyBus(URL, Clock())
    x: list[str] = []
    y: list[str] = []
    bus.listen("x", x.append)
    bus.listen("y", y.append)
    bus._on_notifies([
        Notify(1, "x", "=plain"),
        Notify(1, "x", "="),
        Notify(1, "x", "==starts with ="),
        Notify(1, "x", "#1=plain"),  # a repeat within one batch
        Notify(1, "x", "#12=@7"),
        Notify(1, "x", "no marker: not from a bus"),
        Notify(1, "nobody", "=not listened to"),
        Notify(1, "x", "@41"),  # a large payload: its row must be fetched (no connection here)
        Notify(1, "x", "=after the row"),
        Notify(1, "y", "=other channel is not held back"),
        Notify(1, "x", "@not a number"),
    ])
    assert x == ["plain", "", "=starts with =", "plain", "@7"]
    assert y == ["other channel is not held back"]
    # The row arrives: it is delivered, then what waited behind it.
    (entry, waiting) = bus._backlog["x"]
    entry.payload, entry.ready = "the large payload", True
    bus._drain("x")
    assert x[-2:] == ["the large payload", "after the row"]
    assert "x" not in bus._backlog


def test_unlisten_drops_what_was_held_back() -> None:
    bus = NotifyBus(URL, Clock())
    x: list[str] = []
    bus.listen("x", x.append)
    bus._on_notifies([Notify(1, "x", "@1"), Notify(1, "x", "=behind")])
    bus.unlisten("x")
    assert bus._backlog == {}
    bus._on_notifies([Notify(1, "x", "=after unlisten")])
    assert x == []
