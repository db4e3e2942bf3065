"""The event stream: listeners take the kinds they ask for, and an actor can tell whether any listener wants a
kind before it builds an event (a record per status change, on the hot path)."""

from __future__ import annotations

from uuid import uuid4

from nanoiot.commands.events import DeviceCalled, DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged

DEVICE, TENANT, CUSTOMER = uuid4(), uuid4(), uuid4()


def test_nothing_is_wanted_without_listeners_and_a_typed_listener_wants_only_its_kinds():
    events = EventStream()
    assert not events.wants(RpcStatusChanged) and not events.wants(DeviceOnline)
    seen: list[object] = []
    unsubscribe = events.subscribe(seen.append, (DeviceOnline, DeviceOffline))
    assert events.wants(DeviceOnline) and events.wants(DeviceOffline)
    assert not events.wants(RpcStatusChanged) and not events.wants(DeviceCalled)
    online = DeviceOnline(DEVICE, TENANT, CUSTOMER, "mqtt")
    events.publish(online)
    events.publish(DeviceCalled(DEVICE, TENANT, CUSTOMER, "mqtt", "m"))
    assert seen == [online]
    unsubscribe()
    assert not events.wants(DeviceOnline) and not events.has_listeners


def test_a_listener_of_every_kind_wants_everything():
    events = EventStream()
    seen: list[object] = []
    events.subscribe(seen.append)
    assert events.wants(RpcStatusChanged) and events.wants(DeviceCalled)
    called = DeviceCalled(DEVICE, TENANT, CUSTOMER, "coap", None)
    events.publish(called)
    assert seen == [called]


def test_a_lazy_status_event_builds_its_record_once_and_only_when_read() -> None:
    from uuid import uuid4

    from nanoiot.commands.events import RpcStatusChanged
    from nanoiot.persistence.records import RpcRecord
    from nanoiot.rpc.model import RpcStatus

    record = RpcRecord(id=uuid4(), created_time=5, tenant_id=uuid4(), device_id=uuid4(), expiration_time=9,
                       oneway=True, method="m", params=None, status=RpcStatus.SENT)
    built: list[int] = []

    def build() -> RpcRecord:
        built.append(1)
        return record

    event = RpcStatusChanged.lazily(RpcStatus.SENT, 5, False, build)
    assert (event.type, event.status, event.created_time, event.persistent) == ("RPC_SENT", RpcStatus.SENT, 5, False)
    assert built == []
    assert event.record is record and event.record is record and built == [1]
    assert event == RpcStatusChanged(record, False) and event != RpcStatusChanged(record, True)
