"""Bulk RPC's use case with fakes on a task.Clock: the real CommandService in front of a recording device port (the
test plays the actors: it answers each command's reply address and writes the row the journal would), an in-memory
batch store, and the request parser. No actor, no reactor, no database."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies
from nanoiot.commands.bulk import BulkRequest, BulkRpc, parse_bulk_request
from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.errors import BadRequest, NotFound, PermissionDenied
from nanoiot.persistence.batch_store import BatchRecord, BatchSnapshot
from nanoiot.persistence.records import NULL_UUID, Device, RpcRecord
from nanoiot.rpc.model import RpcFailure, RpcResult, RpcStatus

T0 = 1_700_000_000
NOW = T0 * 1000
TENANT, OTHER_TENANT = uuid4(), uuid4()
CUSTOMER, OTHER_CUSTOMER = uuid4(), uuid4()
ADMIN_ID, CUSTOMER_USER_ID = uuid4(), uuid4()
ADMIN = Initiator(TENANT, user_id=ADMIN_ID)
CUSTOMER_USER = Initiator(TENANT, CUSTOMER, CUSTOMER_USER_ID)


def device(tenant: UUID = TENANT, customer: UUID = NULL_UUID, type: str = "thermostat", name: str = "") -> Device:
    return Device(uuid4(), 0, tenant, customer, name or f"dev-{uuid4().hex[:6]}", type, None, None)


def request(*, device_ids: list[Any] | None = None, device_type: str | None = None, **command: Any) -> BulkRequest:
    raw: dict[str, Any] = {"method": "setTemperature", "params": {"t": 21}, "timeout": 60_000, **command}
    if device_ids is not None:
        raw["deviceIds"] = [str(i) for i in device_ids]
    if device_type is not None:
        raw["deviceType"] = device_type
    return parse_bulk_request(raw, NOW, 10_000, 5_000, 1000)


# --- fakes ----------------------------------------------------------------------------------------------------------


class FakePort:
    """The device port: records what it is told; the test answers as the device's actor would."""

    def __init__(self) -> None:
        self.told: list[tuple[Device, Any]] = []

    def tell(self, device: Device, message: Any) -> None:
        self.told.append((device, message))

    def submitted(self) -> list[m.SubmitRpc]:
        return [message for _, message in self.told if isinstance(message, m.SubmitRpc)]

    def deletes(self) -> list[m.DeleteRpc]:
        return [message for _, message in self.told if isinstance(message, m.DeleteRpc)]


class FakeDevices:
    """The catalog: nothing cached, so every submission must find its device in the batch's own lookup."""

    def __init__(self) -> None:
        self.lookups: list[UUID] = []

    def cached_device(self, device_id: UUID) -> Device | None:
        return None

    def get_device(self, device_id: UUID) -> Deferred:
        self.lookups.append(device_id)
        return succeed(None)


class FakeCommandStore:
    def get_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(None)

    def delete_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(True)

    def list_device_rpcs(self, *args: Any) -> Deferred:
        raise AssertionError("not used")


class FakeBatchStore:
    """rpc_batch and rpc rows in memory, with the real store's semantics."""

    def __init__(self) -> None:
        self.devices: dict[UUID, Device] = {}
        self.batches: dict[UUID, BatchRecord] = {}
        self.rpcs: dict[UUID, RpcRecord] = {}
        self.deleted: list[UUID] = []
        self.slow_insert: Deferred | None = None

    def add(self, *devices: Device) -> list[Device]:
        for d in devices:
            self.devices[d.id] = d
        return list(devices)

    def insert_batch(self, batch: BatchRecord) -> Deferred:
        self.batches[batch.id] = batch
        if self.slow_insert is not None:  # a slow commit: the test fires it
            return self.slow_insert.addCallback(lambda _: batch)
        return succeed(batch)

    def get_batch(self, batch_id: UUID) -> Deferred:
        return succeed(self.batches.get(batch_id))

    def snapshot(self, batch_id: UUID, with_rpc_ids: bool = True) -> Deferred:
        batch = self.batches.get(batch_id)
        if batch is None:
            return succeed(None)
        rows = [r for r in self.rpcs.values() if r.batch_id == batch_id]
        counts: dict[RpcStatus, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        ids = {r.device_id: r.id for r in rows} if with_rpc_ids else {}
        return succeed(BatchSnapshot(batch, counts, ids))

    def unfinished_rpcs(self, batch_id: UUID) -> Deferred:
        return succeed([r for r in self.rpcs.values() if r.batch_id == batch_id and not r.status.is_terminal])

    def delete_rpcs(self, rpc_ids: list[UUID]) -> Deferred:
        gone = [i for i in rpc_ids if self.rpcs.pop(i, None) is not None]
        self.deleted.extend(gone)
        return succeed(len(gone))

    def devices_by_ids(self, device_ids: Any) -> Deferred:
        return succeed({i: self.devices[i] for i in device_ids if i in self.devices})

    def devices_of_type(self, tenant_id: UUID, device_type: str, customer_id: UUID | None = None,
                        limit: int | None = None) -> Deferred:
        found = [d for d in self.devices.values() if d.tenant_id == tenant_id and d.type == device_type
                 and (customer_id is None or d.customer_id == customer_id)]
        return succeed(found[:limit] if limit is not None else found)


class World:
    def __init__(self, chunk: int = 200, window: int = 2000, max_devices: int = 1000) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.port = FakePort()
        self.replies = Replies()
        self.events = EventStream()
        self.published: list[Any] = []
        self.events.subscribe(self.published.append)
        self.commands = CommandService(self.port, self.replies, FakeDevices(), FakeCommandStore(), self.events,
                                       self.clock)
        self.store = FakeBatchStore()
        self.grown = 0
        self.bulk = BulkRpc(self.commands, self.store, self.clock, max_devices, chunk=chunk, window=window,
                            grown=self._grown, grown_every=4)
        self.answered = 0

    def _grown(self) -> None:
        self.grown += 1

    def store_commands(self, count: int | None = None, refuse: set[UUID] = frozenset()) -> None:
        """Play the actors and the journal for the next ``count`` unanswered submissions: the row is written, then
        the caller gets its rpcId (a device in ``refuse`` is over its limit instead)."""
        pending = self.port.submitted()[self.answered:]
        for message in pending[:count]:
            self.answered += 1
            command = message.command
            if command.device_id in refuse:
                self.replies.answer(message.reply_to, RpcResult(
                    failure=RpcFailure.REJECTED, response={"limit": "rpc-max-persistent-per-device", "value": 2}))
                continue
            self.store.rpcs[command.rpc_id] = RpcRecord(
                id=command.rpc_id, created_time=command.created_time, tenant_id=command.tenant_id,
                device_id=command.device_id, expiration_time=command.expiration_time, oneway=command.oneway,
                method=command.method, params=command.params, status=RpcStatus.QUEUED, user_id=command.user_id,
                initiator=command.initiator, batch_id=command.batch_id)
            self.replies.answer(message.reply_to, RpcResult(response={"rpcId": str(command.rpc_id)},
                                                            has_response=True))

    def queue_all(self, batch: BatchRecord, refuse: set[UUID] = frozenset()) -> None:
        """Turn the reactor and answer everything until the batch is queued."""
        for _ in range(10_000):
            self.store_commands(refuse=refuse)
            self.clock.advance(0)
            if not result_of(self.bulk.status(ADMIN, batch.id, False)).queueing:
                return
        raise AssertionError("never finished queueing")

    def set_status(self, rpc_id: UUID, status: RpcStatus) -> None:
        record = self.store.rpcs[rpc_id]
        self.store.rpcs[rpc_id] = RpcRecord(**{**{f: getattr(record, f) for f in record.__slots__},
                                               "status": status})


@pytest.fixture
def w() -> World:
    return World()


def result_of(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    (value,) = results
    if isinstance(value, Failure):
        value.raiseException()
    return value


def error_of(d: Deferred) -> BaseException:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and isinstance(results[0], Failure), f"not refused: {results}"
    return results[0].value


# --- the request ------------------------------------------------------------------------------------------------------


def test_a_request_names_exactly_one_kind_of_target():
    for raw in ({"method": "m"}, {"method": "m", "deviceIds": [str(uuid4())], "deviceType": "t"},
                {"method": "m", "deviceIds": None, "deviceType": None}):
        with pytest.raises(BadRequest, match="exactly one of 'deviceIds'"):
            parse_bulk_request(raw, NOW, 10_000, 5_000, 10)


@pytest.mark.parametrize("ids, message", [
    ([], "non-empty list"),
    ("abc", "non-empty list"),
    ({"a": 1}, "non-empty list"),
])
def test_device_ids_must_be_a_non_empty_list(ids, message):
    with pytest.raises(BadRequest, match=message):
        parse_bulk_request({"method": "m", "deviceIds": ids}, NOW, 10_000, 5_000, 10)


def test_ids_that_are_not_uuids_are_named():
    good = str(uuid4())
    with pytest.raises(BadRequest) as refused:
        parse_bulk_request({"method": "m", "deviceIds": [good, "nope", 7]}, NOW, 10_000, 5_000, 10)
    assert "2 of 'deviceIds' are not UUIDs: nope, 7" in refused.value.message
    assert refused.value.details["invalidDeviceIds"] == ["nope", "7"]


def test_more_devices_than_the_limit_are_refused_and_a_device_named_twice_counts_once():
    ids = [str(uuid4()) for _ in range(3)]
    with pytest.raises(BadRequest, match=r"3 devices, more than a bulk RPC may target \(2, --rpc-bulk-max-devices\)"):
        parse_bulk_request({"method": "m", "deviceIds": ids}, NOW, 10_000, 5_000, 2)
    parsed = parse_bulk_request({"method": "m", "deviceIds": [ids[0], ids[1], ids[0]]}, NOW, 10_000, 5_000, 2)
    assert parsed.device_ids == (UUID(ids[0]), UUID(ids[1]))


@pytest.mark.parametrize("raw, message", [
    ({"deviceType": ""}, "'deviceType' must be a non-empty string"),
    ({"deviceType": 3}, "'deviceType' must be a non-empty string"),
    ({"deviceType": "t", "requestUUID": str(uuid4())}, "'requestUUID' names one command"),
    ({"deviceType": "t", "persistent": False}, "always persistent"),
    ({"deviceType": "t", "oneway": "yes"}, "'oneway' must be true or false"),
    ({"deviceType": "t", "method": None}, "'method' is required"),
    ({"deviceType": "t", "timeout": -1}, "'timeout' must not be negative"),
    ({"deviceType": "t", "retries": "x"}, "'retries' must be a whole number"),
])
def test_the_command_fields_are_validated(raw, message):
    with pytest.raises(BadRequest, match=message):
        parse_bulk_request({"method": "m", **raw}, NOW, 10_000, 5_000, 10)


def test_the_command_is_persistent_with_thingsboards_timeout_rule_and_recorded_as_sent():
    parsed = parse_bulk_request({"deviceType": "valve", "method": "open", "params": {"pct": 50}, "timeout": 1000,
                                 "retries": 2, "additionalInfo": {"why": "test"}, "oneway": True, "qos": 0},
                                NOW, 10_000, 5_000, 10)
    assert parsed.device_type == "valve" and parsed.device_ids is None and parsed.oneway
    body = parsed.body
    assert body.persistent and body.method == "open" and body.params == {"pct": 50}
    assert body.expiration_time == NOW + 5_000  # at least the minimum timeout
    assert parsed.request == {"method": "open", "params": {"pct": 50}, "oneway": True, "timeout": 1000,
                              "expirationTime": NOW + 5_000, "retries": 2, "additionalInfo": {"why": "test"},
                              "qos": 0, "deviceType": "valve"}
    given = parse_bulk_request({"deviceType": "valve", "method": "open", "expirationTime": NOW + 99},
                               NOW, 10_000, 5_000, 10)
    assert given.body.expiration_time == NOW + 99 and not given.oneway


# --- start ------------------------------------------------------------------------------------------------------------


def test_the_batch_is_stored_and_answered_before_its_commands_are_queued(w):
    targets = w.store.add(*(device() for _ in range(3)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    assert w.store.batches[batch.id] == batch
    assert (batch.tenant_id, batch.total, batch.created_time) == (TENANT, 3, NOW)
    assert batch.initiator == {"type": "USER", "id": str(ADMIN_ID), "customerId": None}
    assert batch.request["method"] == "setTemperature" and batch.request["params"] == {"t": 21}
    assert w.store.rpcs == {}  # none stored yet: the answer did not wait for them
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert status.queueing and status.not_yet_queued == 3 and status.status_counts["DELETED"] == 0


def test_each_device_gets_its_own_persistent_command_through_the_command_service(w):
    targets = w.store.add(*(device() for _ in range(3)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets], oneway=True, retries=1)))
    submitted = w.port.submitted()
    assert [told.id for told, _ in w.port.told] == [d.id for d in targets]
    commands = [message.command for message in submitted]
    assert len({c.rpc_id for c in commands}) == 3
    for target, command in zip(targets, commands):
        assert command.device_id == target.id and command.tenant_id == TENANT
        assert command.persistent and command.oneway and command.retries == 1
        assert command.method == "setTemperature" and command.params == {"t": 21}
        assert command.batch_id == batch.id and command.user_id == ADMIN_ID
        assert command.initiator == {"type": "BULK", "batchId": str(batch.id), "userId": str(ADMIN_ID)}
        assert command.expiration_time == NOW + 60_000
    w.queue_all(batch)
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert status.status_counts == {"QUEUED": 3, "SENT": 0, "DELIVERED": 0, "SUCCESSFUL": 0, "TIMEOUT": 0,
                                    "EXPIRED": 0, "FAILED": 0, "DELETED": 0}
    assert status.rpc_ids == {c.device_id: c.rpc_id for c in commands}
    assert not status.queueing and status.not_yet_queued == 0 and status.rejected == {}


def test_commands_go_out_a_chunk_per_reactor_turn_with_a_bounded_number_waiting_to_be_stored():
    w = World(chunk=3, window=6)
    targets = w.store.add(*(device() for _ in range(20)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    assert len(w.port.submitted()) == 3  # the first chunk, then the reactor's turn
    w.clock.advance(0)
    assert len(w.port.submitted()) == 6  # the window is full: nothing more until some are stored
    w.clock.advance(0)
    w.clock.advance(0)
    assert len(w.port.submitted()) == 6
    w.store_commands(2)
    assert len(w.port.submitted()) == 6  # 4 waiting: still more than window - chunk
    w.store_commands(1)
    w.clock.advance(0)
    assert len(w.port.submitted()) == 9
    w.queue_all(batch)
    assert len(w.port.submitted()) == 20 and len(w.store.rpcs) == 20
    assert w.grown == 3  # once at least 4 more commands went out (in whole chunks: 6, 12, 18): the GC hook


def test_a_missing_device_refuses_the_whole_batch_naming_it(w):
    known = w.store.add(device())[0]
    missing = uuid4()
    error = error_of(w.bulk.start(ADMIN, request(device_ids=[known.id, missing])))
    assert isinstance(error, NotFound) and str(missing) in error.message and "1 of the devices" in error.message
    assert error.details == {"notFound": [str(missing)]}
    assert w.store.batches == {} and w.port.told == []


def test_a_device_of_another_tenant_or_customer_refuses_the_whole_batch_naming_it(w):
    mine = w.store.add(device(customer=CUSTOMER))[0]
    foreign = w.store.add(device(tenant=OTHER_TENANT))[0]
    error = error_of(w.bulk.start(ADMIN, request(device_ids=[mine.id, foreign.id])))
    assert isinstance(error, PermissionDenied) and error.details == {"forbidden": [str(foreign.id)]}
    # A customer user reaches its customer's devices only: the tenant's other devices are foreign to it.
    tenants = w.store.add(device())[0]
    error = error_of(w.bulk.start(CUSTOMER_USER, request(device_ids=[mine.id, tenants.id])))
    assert isinstance(error, PermissionDenied) and str(tenants.id) in error.message
    assert w.store.batches == {} and w.port.told == []
    batch = result_of(w.bulk.start(CUSTOMER_USER, request(device_ids=[mine.id])))
    assert batch.total == 1 and batch.initiator["customerId"] == str(CUSTOMER)


def test_a_device_type_reaches_every_device_of_that_type_the_user_may_see(w):
    w.store.add(device(type="meter"), device(type="meter", customer=CUSTOMER), device(type="meter",
                customer=OTHER_CUSTOMER), device(type="valve"), device(type="meter", tenant=OTHER_TENANT))
    batch = result_of(w.bulk.start(ADMIN, request(device_type="meter")))
    assert batch.total == 3 and batch.request["deviceType"] == "meter"
    mine = result_of(w.bulk.start(CUSTOMER_USER, request(device_type="meter")))
    assert mine.total == 1
    customer_commands = [message.command for message in w.port.submitted() if message.command.batch_id == mine.id]
    assert [w.store.devices[c.device_id].customer_id for c in customer_commands] == [CUSTOMER]
    error = error_of(w.bulk.start(CUSTOMER_USER, request(device_type="valve")))
    assert isinstance(error, NotFound) and "No device of type 'valve'" in error.message


def test_more_devices_of_a_type_than_the_limit_are_refused():
    w = World(max_devices=2)
    w.store.add(*(device(type="meter") for _ in range(3)))
    error = error_of(w.bulk.start(ADMIN, request(device_type="meter")))
    assert isinstance(error, BadRequest) and "More than 2 devices of type 'meter'" in error.message
    assert w.store.batches == {}


def test_a_refused_command_is_reported_and_not_counted_as_deleted(w):
    targets = w.store.add(*(device() for _ in range(3)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    w.queue_all(batch, refuse={targets[1].id})
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert status.rejected == {targets[1].id: "REJECTED: rpc-max-persistent-per-device 2"}
    assert status.rejected_count == 1
    assert status.status_counts["QUEUED"] == 2 and status.status_counts["DELETED"] == 0
    assert targets[1].id not in status.rpc_ids


# --- status -----------------------------------------------------------------------------------------------------------


def test_status_counts_the_commands_by_status_and_a_deleted_one_by_what_is_missing(w):
    targets = w.store.add(*(device() for _ in range(5)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    w.queue_all(batch)
    ids = list(result_of(w.bulk.status(ADMIN, batch.id)).rpc_ids.values())
    w.set_status(ids[0], RpcStatus.SUCCESSFUL)
    w.set_status(ids[1], RpcStatus.SENT)
    w.set_status(ids[2], RpcStatus.EXPIRED)
    del w.store.rpcs[ids[3]]
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert status.status_counts == {"QUEUED": 1, "SENT": 1, "DELIVERED": 0, "SUCCESSFUL": 1, "TIMEOUT": 0,
                                    "EXPIRED": 1, "FAILED": 0, "DELETED": 1}
    assert len(status.rpc_ids) == 4


def test_a_batch_is_seen_by_its_tenant_and_by_the_customer_user_who_sent_it_only(w):
    mine = w.store.add(device(customer=CUSTOMER))[0]
    admins = result_of(w.bulk.start(ADMIN, request(device_ids=[mine.id])))
    customers = result_of(w.bulk.start(CUSTOMER_USER, request(device_ids=[mine.id])))
    assert result_of(w.bulk.status(ADMIN, customers.id)).batch == customers
    assert result_of(w.bulk.status(CUSTOMER_USER, customers.id)).batch == customers
    assert isinstance(error_of(w.bulk.status(CUSTOMER_USER, admins.id)), PermissionDenied)
    other_customer = Initiator(TENANT, OTHER_CUSTOMER, uuid4())
    assert isinstance(error_of(w.bulk.status(other_customer, customers.id)), PermissionDenied)
    assert isinstance(error_of(w.bulk.status(Initiator(OTHER_TENANT, user_id=uuid4()), admins.id)), PermissionDenied)
    unknown = uuid4()
    error = error_of(w.bulk.status(ADMIN, unknown))
    assert isinstance(error, NotFound) and str(unknown) in error.message


# --- delete -----------------------------------------------------------------------------------------------------------


def test_delete_takes_each_unfinished_command_out_of_its_device_queue_then_deletes_the_rows(w):
    targets = w.store.add(*(device() for _ in range(4)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    w.queue_all(batch)
    ids = result_of(w.bulk.status(ADMIN, batch.id)).rpc_ids
    w.set_status(ids[targets[0].id], RpcStatus.SUCCESSFUL)
    w.published.clear()
    d = w.bulk.delete(ADMIN, batch.id)
    deletes = w.port.deletes()
    assert sorted(message.rpc_id for message in deletes) == sorted(ids[t.id] for t in targets[1:])
    assert [device.id for device, message in w.port.told if isinstance(message, m.DeleteRpc)] == \
        [t.id for t in targets[1:]]
    assert not d.called and w.store.deleted == []  # the rows go once every actor answered
    for message in deletes[:2]:
        w.replies.answer(message.reply_to, True)  # cancelled in its queue (its actor publishes RPC_DELETED)
    w.replies.answer(deletes[2].reply_to, False)  # not pending there any more
    assert result_of(d) == 3
    assert sorted(w.store.deleted) == sorted(message.rpc_id for message in deletes)
    assert [(type(e), e.record.id, e.record.status) for e in w.published] == \
        [(RpcStatusChanged, deletes[2].rpc_id, RpcStatus.DELETED)]
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert status.status_counts["SUCCESSFUL"] == 1 and status.status_counts["DELETED"] == 3
    assert result_of(w.bulk.delete(ADMIN, batch.id)) == 0  # nothing unfinished is left


def test_delete_while_queueing_stops_the_batch_and_deletes_what_was_queued():
    w = World(chunk=2, window=4)
    targets = w.store.add(*(device() for _ in range(10)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    w.clock.advance(0)
    assert len(w.port.submitted()) == 4
    d = w.bulk.delete(ADMIN, batch.id)
    assert not d.called  # it waits for the submissions already made
    w.store_commands()
    w.clock.advance(0)
    assert len(w.port.submitted()) == 4  # no more
    for message in w.port.deletes():
        w.replies.answer(message.reply_to, True)
    assert result_of(d) == 4 and w.store.rpcs == {}
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert not status.queueing and status.status_counts["DELETED"] == 10


def test_delete_is_refused_for_another_tenant_and_for_an_unknown_batch(w):
    target = w.store.add(device())[0]
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[target.id])))
    assert isinstance(error_of(w.bulk.delete(Initiator(OTHER_TENANT, user_id=uuid4()), batch.id)),
                      PermissionDenied)
    assert isinstance(error_of(w.bulk.delete(ADMIN, uuid4())), NotFound)
    assert w.port.deletes() == []


def test_stopping_the_service_stops_queueing(w):
    w = World(chunk=2, window=100)
    targets = w.store.add(*(device() for _ in range(10)))
    batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    w.bulk.startService()
    w.bulk.stopService()
    w.clock.advance(0)
    w.clock.advance(0)
    assert len(w.port.submitted()) == 2
    w.store_commands()
    assert not result_of(w.bulk.status(ADMIN, batch.id)).queueing


def test_an_unexpected_error_while_queueing_ends_the_batch_and_is_logged(w, monkeypatch):
    targets = w.store.add(*(device() for _ in range(2)))

    def broken(*args: Any, **kwargs: Any) -> Deferred:
        raise RuntimeError("boom")

    monkeypatch.setattr(CommandService, "submit_stored", broken)
    logged: list[Any] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(logged.append)
    try:
        batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert not result_of(w.bulk.status(ADMIN, batch.id)).queueing
    assert any("queueing stopped" in str(event.get("log_format", "")) for event in logged)


def test_commands_that_fail_are_counted_named_up_to_a_limit_and_logged_once(w, monkeypatch):
    import nanoiot.commands.bulk as bulk_module

    monkeypatch.setattr(bulk_module, "MAX_REJECTED_NAMED", 2)
    targets = w.store.add(*(device() for _ in range(4)))
    logged: list[Any] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(logged.append)
    try:
        batch = result_of(w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets])))
        for message in w.port.submitted():
            w.replies.fail(message.reply_to, RuntimeError("database is gone"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    status = result_of(w.bulk.status(ADMIN, batch.id))
    assert not status.queueing and status.rejected_count == 4
    assert status.rejected == {targets[0].id: "database is gone", targets[1].id: "database is gone"}
    assert status.status_counts["DELETED"] == 0
    assert len([e for e in logged if e.get("log_failure") is not None]) == 1


def test_a_caller_that_goes_away_does_not_stop_the_batch(w):
    targets = w.store.add(*(device() for _ in range(2)))
    w.store.slow_insert = Deferred()
    d = w.bulk.start(ADMIN, request(device_ids=[d.id for d in targets]))
    d.cancel()  # the REST client disconnected while the batch row was being stored
    assert isinstance(error_of(d), CancelledError)
    w.store.slow_insert.callback(None)
    [batch] = w.store.batches.values()
    w.queue_all(batch)
    assert len(w.store.rpcs) == 2
