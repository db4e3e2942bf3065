"""The presence book: active by sessions on this node, connect/disconnect times, counts by transport."""

from uuid import uuid4

from twisted.internet.task import Clock

from nanoiot.commands.events import DeviceOffline, DeviceOnline, EventStream
from nanoiot.commands.presence import PresenceBook

TENANT, CUSTOMER = uuid4(), uuid4()


def make(node: str = "") -> tuple[PresenceBook, EventStream, Clock]:
    clock, events = Clock(), EventStream()
    book = PresenceBook(clock, node)
    book.start(events)
    return book, events, clock


def test_a_device_is_active_between_its_online_and_offline_events_with_their_times() -> None:
    book, events, clock = make()
    device = uuid4()
    assert not book.active(device) and book.get(device) is None
    clock.advance(10)
    events.publish(DeviceOnline(device, TENANT, CUSTOMER, "mqtt"))
    assert book.active(device) and book.get(device).last_connect_ms == 10_000
    clock.advance(5)
    events.publish(DeviceOffline(device, TENANT, CUSTOMER, "mqtt"))
    entry = book.get(device)
    assert not book.active(device) and (entry.last_connect_ms, entry.last_disconnect_ms) == (10_000, 15_000)


def test_counts_by_transport_follow_transitions_and_deletions() -> None:
    book, events, _ = make()
    a, b = uuid4(), uuid4()
    events.publish(DeviceOnline(a, TENANT, CUSTOMER, "mqtt"))
    events.publish(DeviceOnline(b, TENANT, CUSTOMER, "coap"))
    assert book.by_transport() == {"mqtt": 1, "coap": 1}
    events.publish(DeviceOffline(a, TENANT, CUSTOMER, "http"))  # its last session: still leaves the MQTT count
    events.publish(DeviceOffline(a, TENANT, CUSTOMER, "http"))  # twice: nothing more to take
    assert book.by_transport() == {"coap": 1}
    book.forget(b)
    assert book.by_transport() == {} and not book.active(b)


def test_a_node_counts_only_its_own_sessions_and_stops_listening() -> None:
    book, events, _ = make("node-a")
    mine, theirs = uuid4(), uuid4()
    events.publish(DeviceOnline(mine, TENANT, CUSTOMER, "mqtt", node="node-a"))
    events.publish(DeviceOnline(theirs, TENANT, CUSTOMER, "mqtt", node="node-b"))
    assert book.active(mine) and not book.active(theirs)
    book.stop()
    assert not events.has_listeners
