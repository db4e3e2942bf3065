"""The command service with fake actors: a recording device port (the test answers through ``replies``), fake
devices, a fake command store and a real EventStream, all on a task.Clock. No actor, no reactor, no database."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies, ReplyTo
from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.commands.service import DEVICE_NOT_FOUND, CommandService, Initiator
from nanoiot.errors import Conflict, InvalidArguments, NanoError, NotFound, PermissionDenied
from nanoiot.persistence.records import NULL_UUID, Device, Page, PageLink, RpcRecord
from nanoiot.rpc.body import RpcBody
from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcResult, RpcStatus

T0 = 1_700_000_000
TENANT, OTHER_TENANT = uuid4(), uuid4()
CUSTOMER, OTHER_CUSTOMER = uuid4(), uuid4()
USER = uuid4()


def device(tenant: UUID = TENANT, customer: UUID = NULL_UUID, name: str = "dev") -> Device:
    return Device(uuid4(), 0, tenant, customer, name, "default", None, None)


def body(method: str = "setGpio", params: Any = None, persistent: bool = False, request_uuid: UUID | None = None,
         expiration_time: int = T0 * 1000 + 10_000, retries: int | None = None, qos: int | None = None,
         additional_info: Any = None) -> RpcBody:
    return RpcBody(method=method, params=params, timeout=10_000, expiration_time=expiration_time,
                   persistent=persistent, retries=retries, additional_info=additional_info,
                   request_uuid=request_uuid or uuid4(), qos=qos)


def record(of: Device, status: RpcStatus = RpcStatus.QUEUED, rpc_id: UUID | None = None) -> RpcRecord:
    return RpcRecord(id=rpc_id or uuid4(), created_time=T0 * 1000, tenant_id=of.tenant_id, device_id=of.id,
                     expiration_time=T0 * 1000 + 60_000, oneway=False, method="m", params={"a": 1}, status=status,
                     user_id=USER, seq=7)


class FakePort:
    """The device port: records what it is told; the test plays the actor by answering the reply address."""

    def __init__(self) -> None:
        self.told: list[tuple[Device, Any]] = []

    def tell(self, device: Device, message: Any) -> None:
        self.told.append((device, message))

    def messages(self, kind: type) -> list[Any]:
        return [message for _, message in self.told if isinstance(message, kind)]


class FakeDevices:
    def __init__(self) -> None:
        self.known: dict[UUID, Device] = {}
        self.cached: dict[UUID, Device] = {}
        #: Every get_device call, in order.
        self.lookups: list[UUID] = []

    def add(self, d: Device, cached: bool = False) -> Device:
        self.known[d.id] = d
        if cached:
            self.cached[d.id] = d
        return d

    def cached_device(self, device_id: UUID) -> Device | None:
        return self.cached.get(device_id)

    def get_device(self, device_id: UUID) -> Deferred:
        self.lookups.append(device_id)
        return succeed(self.known.get(device_id))


class FakeStore:
    def __init__(self) -> None:
        self.rpcs: dict[UUID, RpcRecord] = {}
        self.deleted: list[UUID] = []
        self.listed: list[tuple[UUID, PageLink, RpcStatus | None]] = []
        #: When set, delete_rpc returns this (a Deferred the test fires: a slow, durable delete).
        self.delete_result: Deferred | None = None

    def add(self, r: RpcRecord) -> RpcRecord:
        self.rpcs[r.id] = r
        return r

    def get_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(self.rpcs.get(rpc_id))

    def delete_rpc(self, rpc_id: UUID) -> Deferred:
        self.deleted.append(rpc_id)
        self.rpcs.pop(rpc_id, None)
        return self.delete_result if self.delete_result is not None else succeed(None)

    def list_device_rpcs(self, device_id: UUID, link: PageLink, status: RpcStatus | None) -> Deferred:
        self.listed.append((device_id, link, status))
        data = [r for r in self.rpcs.values() if r.device_id == device_id and (status is None or r.status is status)]
        return succeed(Page(data, len(data), link.page_size, link.page))


class World:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.port = FakePort()
        self.replies = Replies()
        self.devices = FakeDevices()
        self.store = FakeStore()
        self.events = EventStream()
        self.published: list[Any] = []
        self.events.subscribe(self.published.append)
        self.service = CommandService(self.port, self.replies, self.devices, self.store, self.events, self.clock)

    def answer_last(self, value: Any) -> None:
        """Answer the last message told to the port, as its actor would."""
        _, message = self.port.told[-1]
        self.replies.answer(message.reply_to, value)


@pytest.fixture
def w() -> World:
    return World()


TENANT_ADMIN = Initiator(TENANT, user_id=USER)


def result_of(d: Deferred) -> Any:
    """The value a fired Deferred holds (fails the test if it has not fired or failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    (value,) = results
    if isinstance(value, Failure):
        value.raiseException()
    return value


def error_of(call: Any, *args: Any) -> BaseException:
    """The refusal of a service call, whether it is raised at once or errbacks its Deferred."""
    try:
        d = call(*args)
    except NanoError as error:
        return error
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and isinstance(results[0], Failure), f"not refused: {results}"
    return results[0].value


# --- submit ----------------------------------------------------------------------------------------------------------


def test_a_command_is_built_from_the_body_and_the_initiator_and_told_with_a_reply_address(w):
    target = w.devices.add(device())
    w.clock.advance(2.5)
    given = body("setGpio", {"pin": 7}, persistent=True, retries=3, qos=0, additional_info={"note": "x"},
                 expiration_time=T0 * 1000 + 99_000)
    d = w.service.submit(TENANT_ADMIN, target.id, given, oneway=True)
    [(told_device, message)] = w.port.told
    assert told_device is target and isinstance(message, m.SubmitRpc)
    assert message.command == RpcCommand(
        rpc_id=given.request_uuid, tenant_id=TENANT, device_id=target.id, method="setGpio", params={"pin": 7},
        oneway=True, expiration_time=T0 * 1000 + 99_000, created_time=T0 * 1000 + 2500, persistent=True,
        retries=3, additional_info={"note": "x"}, qos=0, user_id=USER, initiator={"type": "USER", "id": str(USER)})
    assert isinstance(message.reply_to, ReplyTo) and w.replies.waiting(message.reply_to)
    assert len(w.replies) == 1 and not d.called


def test_the_caller_gets_what_the_actor_answers(w):
    target = w.devices.add(device())
    d = w.service.submit(TENANT_ADMIN, target.id, body(), oneway=False)
    assert not d.called
    answer = RpcResult(response={"t": 21.5}, has_response=True)
    w.answer_last(answer)
    assert result_of(d) is answer
    assert len(w.replies) == 0


def test_a_failed_command_is_a_result_not_an_error(w):
    target = w.devices.add(device(), cached=True)
    d = w.service.submit(TENANT_ADMIN, target.id, body(), oneway=False)
    w.answer_last(RpcResult(failure=RpcFailure.DEVICE_OFFLINE))
    assert result_of(d).failure is RpcFailure.DEVICE_OFFLINE


def test_an_unknown_device_is_not_found_and_nothing_is_told(w):
    error = error_of(w.service.submit, TENANT_ADMIN, uuid4(), body(), False)
    assert isinstance(error, NotFound) and error.message == DEVICE_NOT_FOUND
    assert w.port.told == [] and len(w.replies) == 0


@pytest.mark.parametrize("cached", [False, True])
def test_another_tenants_device_is_permission_denied(w, cached):
    target = w.devices.add(device(tenant=OTHER_TENANT), cached=cached)
    error = error_of(w.service.submit, TENANT_ADMIN, target.id, body(), False)
    assert isinstance(error, PermissionDenied)
    assert w.port.told == [] and len(w.replies) == 0


@pytest.mark.parametrize("cached", [False, True])
def test_a_customer_user_reaches_only_its_own_customers_devices(w, cached):
    mine = w.devices.add(device(customer=CUSTOMER), cached=cached)
    theirs = w.devices.add(device(customer=OTHER_CUSTOMER), cached=cached)
    unassigned = w.devices.add(device(), cached=cached)
    customer = Initiator(TENANT, customer_id=CUSTOMER, user_id=USER)
    assert isinstance(error_of(w.service.submit, customer, theirs.id, body(), False), PermissionDenied)
    assert isinstance(error_of(w.service.submit, customer, unassigned.id, body(), False), PermissionDenied)
    assert w.port.told == []
    w.service.submit(customer, mine.id, body(), False)
    assert [d.id for d, _ in w.port.told] == [mine.id]
    # the tenant admin reaches them all
    w.service.submit(TENANT_ADMIN, theirs.id, body(), False)
    assert [d.id for d, _ in w.port.told] == [mine.id, theirs.id]


def test_a_refusal_on_the_fast_path_errbacks_as_documented_instead_of_raising(w):
    """``submit``'s docstring: "errbacks with a NanoError for a command that is refused before it is sent". A
    device in the cache takes the fast path, which must keep that promise too."""
    target = w.devices.add(device(tenant=OTHER_TENANT), cached=True)
    try:
        d = w.service.submit(TENANT_ADMIN, target.id, body(), False)
    except NanoError as error:
        pytest.fail(f"submit raised {error!r} at once instead of returning a failed Deferred")
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(PermissionDenied)


def test_a_cached_device_takes_the_fast_path_without_a_lookup(w):
    target = w.devices.add(device(), cached=True)
    d = w.service.submit(TENANT_ADMIN, target.id, body(), oneway=False)
    assert w.devices.lookups == []
    assert [d_.id for d_, _ in w.port.told] == [target.id]
    w.answer_last(RpcResult(response=1, has_response=True))
    assert result_of(d).response == 1


def test_a_device_not_in_the_cache_is_looked_up(w):
    target = w.devices.add(device())
    w.service.submit(TENANT_ADMIN, target.id, body(), oneway=False)
    assert w.devices.lookups == [target.id]
    assert [d.id for d, _ in w.port.told] == [target.id]


def test_a_known_request_uuid_of_the_same_device_answers_its_rpc_id_without_telling_the_port(w):
    target = w.devices.add(device(), cached=True)
    known = w.store.add(record(target))
    d = w.service.submit(TENANT_ADMIN, target.id, body(persistent=True, request_uuid=known.id), False,
                         idempotent=True)
    assert result_of(d) == RpcResult(response={"rpcId": str(known.id)}, has_response=True)
    assert w.port.told == [] and len(w.replies) == 0


def test_a_known_request_uuid_of_another_device_is_a_conflict(w):
    first = w.devices.add(device(name="first"))
    second = w.devices.add(device(name="second"))
    known = w.store.add(record(first))
    error = error_of(w.service.submit, TENANT_ADMIN, second.id, body(persistent=True, request_uuid=known.id),
                     False, True)
    assert isinstance(error, Conflict) and str(known.id) in error.message
    assert w.port.told == []


def test_a_new_request_uuid_is_sent_and_an_unflagged_one_is_not_checked(w):
    target = w.devices.add(device(), cached=True)
    known = w.store.add(record(target))
    w.service.submit(TENANT_ADMIN, target.id, body(persistent=True, request_uuid=uuid4()), False, idempotent=True)
    assert len(w.port.messages(m.SubmitRpc)) == 1
    # the same id but not given by the caller (idempotent=False): the service does not look, the actor decides
    w.service.submit(TENANT_ADMIN, target.id, body(persistent=True, request_uuid=known.id), False)
    assert [msg.command.rpc_id for msg in w.port.messages(m.SubmitRpc)][-1] == known.id


def test_an_idempotent_request_uuid_of_another_tenants_device_is_denied_before_the_store_is_read(w):
    target = w.devices.add(device(tenant=OTHER_TENANT))
    known = w.store.add(record(target))
    error = error_of(w.service.submit, TENANT_ADMIN, target.id, body(persistent=True, request_uuid=known.id),
                     False, True)
    assert isinstance(error, PermissionDenied)


@pytest.mark.parametrize("cached, idempotent", [(True, False), (False, False), (True, True)])
def test_cancelling_the_callers_deferred_forgets_its_correlation(w, cached, idempotent):
    target = w.devices.add(device(), cached=cached)
    d = w.service.submit(TENANT_ADMIN, target.id, body(persistent=idempotent), False, idempotent=idempotent)
    assert len(w.replies) == 1
    d.cancel()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)
    assert len(w.replies) == 0
    # the actor's late answer goes nowhere, and does not blow up
    _, message = w.port.told[-1]
    assert not w.replies.waiting(message.reply_to)
    w.replies.answer(message.reply_to, RpcResult())


# --- get / list ------------------------------------------------------------------------------------------------------


def test_get_returns_the_stored_command(w):
    target = w.devices.add(device())
    stored = w.store.add(record(target))
    assert result_of(w.service.get(TENANT_ADMIN, stored.id)) is stored


def test_get_of_an_unknown_command_or_of_a_deleted_device_is_not_found(w):
    assert isinstance(error_of(w.service.get, TENANT_ADMIN, uuid4()), NotFound)
    orphan = w.store.add(record(device()))  # its device is not known any more
    assert isinstance(error_of(w.service.get, TENANT_ADMIN, orphan.id), NotFound)


def test_get_of_another_tenants_command_is_permission_denied(w):
    theirs = w.devices.add(device(tenant=OTHER_TENANT))
    stored = w.store.add(record(theirs))
    assert isinstance(error_of(w.service.get, TENANT_ADMIN, stored.id), PermissionDenied)


def test_get_of_another_customers_command_is_permission_denied_for_a_customer_user(w):
    theirs = w.devices.add(device(customer=OTHER_CUSTOMER))
    stored = w.store.add(record(theirs))
    customer = Initiator(TENANT, customer_id=CUSTOMER, user_id=USER)
    assert isinstance(error_of(w.service.get, customer, stored.id), PermissionDenied)


def test_list_asks_the_store_for_the_devices_page(w):
    target = w.devices.add(device())
    queued = w.store.add(record(target))
    w.store.add(record(target, RpcStatus.SUCCESSFUL))
    link = PageLink(10, 0)
    page = result_of(w.service.list(TENANT_ADMIN, target.id, link, RpcStatus.QUEUED))
    assert page.data == [queued]
    assert w.store.listed == [(target.id, link, RpcStatus.QUEUED)]


def test_list_refuses_the_deleted_status_without_reading_anything(w):
    target = w.devices.add(device())
    error = error_of(w.service.list, TENANT_ADMIN, target.id, PageLink(10, 0), RpcStatus.DELETED)
    assert isinstance(error, InvalidArguments)
    assert w.store.listed == [] and w.devices.lookups == []


def test_list_of_another_tenants_device_is_permission_denied(w):
    theirs = w.devices.add(device(tenant=OTHER_TENANT))
    assert isinstance(error_of(w.service.list, TENANT_ADMIN, theirs.id, PageLink(10, 0)), PermissionDenied)
    assert w.store.listed == []


# --- delete ----------------------------------------------------------------------------------------------------------


def test_deleting_a_pending_command_takes_it_out_of_the_actor_first_then_out_of_the_store(w):
    target = w.devices.add(device())
    stored = w.store.add(record(target, RpcStatus.SENT))
    d = w.service.delete(TENANT_ADMIN, stored.id)
    [(told_device, message)] = w.port.told
    assert told_device is target and isinstance(message, m.DeleteRpc) and message.rpc_id == stored.id
    assert w.replies.waiting(message.reply_to)
    # nothing is deleted from the store until the actor answered
    assert not d.called and w.store.deleted == []
    w.store.delete_result = Deferred()
    w.replies.answer(message.reply_to, True)
    assert w.store.deleted == [stored.id]
    # and the caller waits for the durable deletion
    assert not d.called
    w.store.delete_result.callback(None)
    assert result_of(d) is None
    # the actor had it pending and published RPC_DELETED itself: not a second time here
    assert w.published == []


def test_deleting_a_pending_command_the_actor_did_not_hold_publishes_rpc_deleted(w):
    target = w.devices.add(device())
    stored = w.store.add(record(target, RpcStatus.QUEUED))
    d = w.service.delete(TENANT_ADMIN, stored.id)
    w.answer_last(False)  # not pending there (e.g. held by no node in a cluster)
    assert result_of(d) is None
    assert w.store.deleted == [stored.id]
    [event] = w.published
    assert isinstance(event, RpcStatusChanged) and event.type == "RPC_DELETED" and event.persistent
    assert event.record.id == stored.id and event.record.status is RpcStatus.DELETED
    assert event.record.method == stored.method and event.record.device_id == target.id


@pytest.mark.parametrize("status", [RpcStatus.SUCCESSFUL, RpcStatus.FAILED, RpcStatus.EXPIRED])
def test_deleting_a_finished_command_does_not_tell_the_port(w, status):
    target = w.devices.add(device())
    stored = w.store.add(record(target, status))
    d = w.service.delete(TENANT_ADMIN, stored.id)
    assert result_of(d) is None
    assert w.port.told == [] and len(w.replies) == 0
    assert w.store.deleted == [stored.id]
    assert [(e.type, e.record.id) for e in w.published] == [("RPC_DELETED", stored.id)]


def test_deleting_another_tenants_command_is_denied_and_deletes_nothing(w):
    theirs = w.devices.add(device(tenant=OTHER_TENANT))
    stored = w.store.add(record(theirs))
    assert isinstance(error_of(w.service.delete, TENANT_ADMIN, stored.id), PermissionDenied)
    assert w.port.told == [] and w.store.deleted == [] and w.published == []


def test_deleting_an_unknown_command_is_not_found(w):
    assert isinstance(error_of(w.service.delete, TENANT_ADMIN, uuid4()), NotFound)
    assert w.port.told == [] and w.store.deleted == []


# --- a node lost with the command (cluster) --------------------------------------------------------------------------


def test_a_persistent_command_whose_node_was_lost_is_sent_once_more_when_it_was_not_stored(w):
    from nanoiot.errors import RouteLost

    target = w.devices.add(device(), cached=True)
    given = body("durable", persistent=True)
    d = w.service.submit(TENANT_ADMIN, target.id, given, oneway=False)
    _, first = w.port.told[-1]
    w.replies.fail(first.reply_to, RouteLost("Node n1 stopped before it answered"))
    assert len(w.port.told) == 2  # not stored by the lost node: sent again, same command id
    _, second = w.port.told[-1]
    assert second.command.rpc_id == first.command.rpc_id and second.reply_to != first.reply_to
    w.replies.answer(second.reply_to, RpcResult(response={"rpcId": str(given.request_uuid)}, has_response=True))
    assert result_of(d).response == {"rpcId": str(given.request_uuid)}


def test_a_persistent_command_the_lost_node_had_stored_is_answered_with_its_id_and_not_sent_again(w):
    from nanoiot.errors import RouteLost

    target = w.devices.add(device(), cached=True)
    given = body("durable", persistent=True)
    d = w.service.submit(TENANT_ADMIN, target.id, given, oneway=False)
    _, first = w.port.told[-1]
    w.store.add(record(target, rpc_id=given.request_uuid))
    w.replies.fail(first.reply_to, RouteLost("Node n1 stopped before it answered"))
    assert len(w.port.told) == 1
    assert result_of(d).response == {"rpcId": str(given.request_uuid)}


def test_a_persistent_command_is_tried_once_more_only_once_and_a_lightweight_one_not_at_all(w):
    from nanoiot.errors import RouteLost

    target = w.devices.add(device(), cached=True)
    d = w.service.submit(TENANT_ADMIN, target.id, body("durable", persistent=True), oneway=False)
    for _ in range(2):
        _, message = w.port.told[-1]
        w.replies.fail(message.reply_to, RouteLost())
    assert len(w.port.told) == 2 and isinstance(error_of(lambda: d), RouteLost)
    light = w.service.submit(TENANT_ADMIN, target.id, body("now"), oneway=False)
    _, message = w.port.told[-1]
    w.replies.fail(message.reply_to, RouteLost())
    assert len(w.port.told) == 3 and isinstance(error_of(lambda: light), RouteLost)


@pytest.mark.parametrize("initiator, recorded", [
    (Initiator(TENANT, user_id=USER), {"type": "USER", "id": str(USER)}),
    (Initiator(TENANT, device_id=USER), {"type": "DEVICE", "id": str(USER)}),
    (Initiator(TENANT, rule_chain_id=USER, rule_node_id=TENANT),
     {"type": "RULE_CHAIN", "ruleChainId": str(USER), "ruleNodeId": str(TENANT)}),
    (Initiator(TENANT, user_id=TENANT, batch_id=USER), {"type": "BULK", "batchId": str(USER), "userId": str(TENANT)}),
    (Initiator(TENANT), None),
])
def test_every_command_records_who_sent_it(w, initiator, recorded):
    target = w.devices.add(device(), cached=True)
    w.service.submit(initiator, target.id, body("m"), oneway=True)
    _, message = w.port.told[-1]
    assert message.command.initiator == recorded
    assert message.command.batch_id == initiator.batch_id


# --- many devices at once (bulk RPC) ---------------------------------------------------------------------------------


class StoringPort(FakePort):
    """A node holding every device: a bulk RPC's commands go to their actors with their chunk."""

    holds_every_device = True


def test_commands_for_many_devices_go_to_their_actors_with_one_deferred_for_the_chunk(w):
    w.port = w.service.port = StoringPort()
    targets = [device(name=f"d{i}") for i in range(3)]
    batch = uuid4()
    initiator = Initiator(TENANT, user_id=USER, batch_id=batch)
    done = w.service.submit_stored(initiator, [(t, body("bulk", persistent=True)) for t in targets], False)
    told = w.port.messages(m.SubmitBatched)
    assert [d for d, _ in w.port.told] == targets and len(told) == 3
    assert [msg.command.device_id for msg in told] == [t.id for t in targets]
    assert {msg.command.batch_id for msg in told} == {batch} and told[0].command.initiator["type"] == "BULK"
    assert all(msg.command.persistent for msg in told) and len({msg.command.rpc_id for msg in told}) == 3
    chunk = told[0].chunk
    assert all(msg.chunk is chunk for msg in told) and len(w.replies) == 0  # no reply address per command
    chunk.stored()
    chunk.refuse(targets[1].id, RpcResult(failure=RpcFailure.REJECTED, response={"limit": "x", "value": 1}))
    assert not done.called  # fired once every command is stored or refused, not before
    chunk.stored()
    outcome = result_of(done)
    assert [device_id for device_id, _ in outcome.refused] == [targets[1].id]


def test_a_rule_chains_command_of_a_chunk_is_counted_into_the_chunk(w):
    w.port = w.service.port = StoringPort()
    taken: list[Deferred] = []

    def interceptor(initiator: Any, target: Device, b: RpcBody, oneway: bool) -> Deferred | None:
        if target.name == "ruled":
            taken.append(Deferred())
            return taken[-1]
        return None

    w.service.interceptor = interceptor
    ruled, plain = device(name="ruled"), device(name="plain")
    done = w.service.submit_stored(TENANT_ADMIN, [(ruled, body("bulk", persistent=True)),
                                                  (plain, body("bulk", persistent=True))], False)
    [msg] = w.port.messages(m.SubmitBatched)
    assert msg.command.device_id == plain.id
    msg.chunk.stored()
    assert not done.called
    taken[0].errback(RuntimeError("rule chain failed"))
    [(device_id, why)] = result_of(done).refused
    assert device_id == ruled.id and why.check(RuntimeError)


def test_a_node_that_does_not_hold_every_device_submits_them_one_by_one(w):
    targets = [device() for _ in range(2)]
    done = w.service.submit_stored(TENANT_ADMIN, [(t, body("bulk", persistent=True)) for t in targets], False)
    told = w.port.messages(m.SubmitRpc)
    assert [type(msg) for _, msg in w.port.told] == [m.SubmitRpc, m.SubmitRpc]
    w.replies.answer(told[0].reply_to, RpcResult(response={"rpcId": str(told[0].command.rpc_id)}, has_response=True))
    assert not done.called
    w.replies.fail(told[1].reply_to, RuntimeError("disk full"))
    [(device_id, why)] = result_of(done).refused
    assert device_id == targets[1].id and why.check(RuntimeError)
