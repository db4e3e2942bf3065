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


def _record(status):
    from nanoiot.persistence.records import RpcRecord

    return RpcRecord(id=uuid4(), created_time=5, tenant_id=TENANT, device_id=DEVICE, expiration_time=9, oneway=False,
                     method="m", params=None, status=status)


def test_a_tally_counts_every_status_change_without_an_event_and_events_are_built_only_for_listeners():
    from nanoiot.rpc.model import RpcStatus

    events = EventStream()
    counted: list[tuple] = []
    built: list[RpcStatus] = []

    def build(status):
        built.append(status)
        return _record(status)

    stop = events.tally(lambda *values: counted.append(values))
    assert events.wants(RpcStatusChanged) and not events.wants(DeviceOnline) and events.has_listeners
    events.status_changed(RpcStatus.SENT, 5, False, build, RpcStatus.SENT)
    events.publish(RpcStatusChanged(_record(RpcStatus.DELETED), True))  # what the command service publishes
    assert counted == [(RpcStatus.SENT, False, 5), (RpcStatus.DELETED, True, 5)] and built == []
    seen: list[RpcStatusChanged] = []
    events.subscribe(seen.append, (RpcStatusChanged,))
    events.status_changed(RpcStatus.SUCCESSFUL, 5, False, build, RpcStatus.SUCCESSFUL)
    assert len(counted) == 3 and [e.record.status for e in seen] == [RpcStatus.SUCCESSFUL] == built
    stop()
    events.status_changed(RpcStatus.FAILED, 5, True, build, RpcStatus.FAILED)
    assert len(counted) == 3 and len(seen) == 2


def test_a_failing_tally_is_logged_and_the_listeners_still_get_the_event():
    from nanoiot.rpc.model import RpcStatus

    events = EventStream()
    events.tally(lambda *values: 1 / 0)
    seen: list[object] = []
    events.subscribe(seen.append)
    events.status_changed(RpcStatus.SENT, 5, False, _record, RpcStatus.SENT)
    assert [e.status for e in seen] == [RpcStatus.SENT]


def test_a_persistent_only_listener_costs_lightweight_status_changes_no_event():
    from nanoiot.rpc.model import RpcStatus

    events = EventStream()
    built: list[RpcStatus] = []

    def build(status):
        built.append(status)
        return _record(status)

    persistent: list[RpcStatusChanged] = []
    unsubscribe = events.subscribe(persistent.append, (RpcStatusChanged,), persistent_only=True)
    assert events.wants(RpcStatusChanged)
    events.status_changed(RpcStatus.SENT, 5, False, build, RpcStatus.SENT)
    events.publish(RpcStatusChanged(_record(RpcStatus.DELETED), False))
    assert persistent == [] and built == []  # no event made for the lightweight one
    events.status_changed(RpcStatus.QUEUED, 5, True, build, RpcStatus.QUEUED)
    events.publish(RpcStatusChanged(_record(RpcStatus.DELETED), True))
    assert [(e.status, e.persistent) for e in persistent] == [(RpcStatus.QUEUED, True), (RpcStatus.DELETED, True)]
    every: list[object] = []
    events.subscribe(every.append)  # a listener of every event: lightweight changes are built again, for it alone
    events.status_changed(RpcStatus.SUCCESSFUL, 5, False, build, RpcStatus.SUCCESSFUL)
    assert [e.status for e in every] == [RpcStatus.SUCCESSFUL] and len(persistent) == 2
    unsubscribe()
    events.status_changed(RpcStatus.FAILED, 5, True, build, RpcStatus.FAILED)
    assert len(persistent) == 2 and len(every) == 2
