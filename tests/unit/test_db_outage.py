"""A database outage in memory: the real journal and device actors on a task.Clock, over a table that goes away and
comes back as the repository reports it (DatabaseUnavailable, ``when_healthy``)."""

from __future__ import annotations

from typing import Any, Iterator
from uuid import uuid4

import pytest
import pytest_twisted
from sqlalchemy.exc import OperationalError
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed

from nanoiot.actors import messages as m
from nanoiot.errors import ServiceUnavailable
from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.errors import DatabaseUnavailable, is_unavailable
from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.records import RpcRecord, RpcStatus
from nanoiot.persistence.repository import Repository
from nanoiot.port.session import Delivery
from nanoiot.transports.coap import codec as coap
from nanoiot.transports.coap.testing import CoapHarness
from nanoiot.transports.mqtt import codec
from tests.fixtures.actors import actors_on_clock
from tests.fixtures.processes import bounded
from tests.unit.test_cluster_port import Cluster
from tests.unit.test_device_actor import DEVICE, Asked, FakeSession, command, directory_on, run
from tests.unit.test_mqtt_protocol import Harness as MqttHarness


class Health:
    """The repository's health contract: ``when_healthy`` waits while ``down``; ``come_back()`` fires it, as the
    repository's probe does."""

    down: bool
    _waiting: list[Deferred]

    def when_healthy(self) -> Deferred:
        if not self.down:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def come_back(self) -> None:
        self.down = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class Table(Health):
    """The rpc table behind the journal, with the repository's health contract: while ``down`` every write fails
    with DatabaseUnavailable; ``come_back()`` fires what waits on ``when_healthy``, as the repository's probe does."""

    def __init__(self) -> None:
        self.rows: dict[Any, RpcStatus] = {}
        self.down = False
        self.attempts = 0
        self._waiting: list[Deferred] = []

    @property
    def healthy(self) -> bool:
        return not self.down


    def write_rpc_batch(self, inserts: list, changes: list, deletes: list) -> Deferred:
        self.attempts += 1
        if self.down:
            return fail(DatabaseUnavailable(retry_after=7))
        for record in inserts:
            self.rows[record.id] = record.status
        for rpc_id, status, *_ in changes:
            if rpc_id in self.rows:
                self.rows[rpc_id] = status
        for rpc_id in deletes:
            self.rows.pop(rpc_id, None)
        return succeed([])


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[task.Clock]:
    with actors_on_clock(monkeypatch) as clock:
        yield clock


def settle(d: Deferred) -> Any:
    results: list = []
    d.addBoth(results.append)
    assert results, "not settled"
    return results[0]


def record(status: RpcStatus = RpcStatus.QUEUED) -> RpcRecord:
    return RpcRecord(uuid4(), 0, uuid4(), uuid4(), 1, False, "m", None, status)


# --- the journal ------------------------------------------------------------------------------------------------------

def test_while_the_database_is_out_of_reach_inserts_fail_at_once_and_changes_wait_for_it_in_order() -> None:
    clock, table = task.Clock(), Table()
    journal = RpcJournal(table, clock)  # type: ignore[arg-type]
    stored = record()
    journal.insert(stored)
    clock.advance(0)
    assert table.rows == {stored.id: RpcStatus.QUEUED}

    table.down = True
    sent = journal.change(stored.id, RpcStatus.SENT)
    refused = journal.insert(record())
    clock.advance(0)
    error = settle(refused)
    assert error.check(DatabaseUnavailable) and error.value.http_status == 503 and error.value.retry_after == 7
    assert not sent.called  # held, not dropped
    # More of both while held: the insert is refused on the next turn without a write, the change waits behind.
    attempts = table.attempts
    delivered = journal.change(stored.id, RpcStatus.DELIVERED)
    later = journal.insert(record())
    barrier = journal.flushed()
    clock.advance(0)
    assert settle(later).check(DatabaseUnavailable) and settle(barrier).check(DatabaseUnavailable)
    assert table.attempts == attempts and not delivered.called

    table.come_back()
    clock.advance(0)
    assert settle(sent) is None and settle(delivered) is None
    assert table.rows[stored.id] is RpcStatus.DELIVERED
    fresh = record()
    assert settle(_flushed(journal.insert(fresh), clock)) is None and table.rows[fresh.id] is RpcStatus.QUEUED


def _flushed(d: Deferred, clock: task.Clock) -> Deferred:
    clock.advance(0)
    return d


def test_the_classifier_takes_the_repositorys_own_error_for_an_unreachable_database() -> None:
    assert is_unavailable(DatabaseUnavailable())
    assert isinstance(DatabaseUnavailable(), ServiceUnavailable)
    assert DatabaseUnavailable(retry_after=5).headers() == {b"retry-after": b"5"}


# --- device actors over the journal -----------------------------------------------------------------------------------

def test_a_device_connected_during_the_outage_gets_its_queued_command_when_the_database_is_back(clock):
    table = Table()
    journal = RpcJournal(table, clock)  # type: ignore[arg-type]
    directory = directory_on(clock, journal=journal)
    queued = Asked(directory, m.SubmitRpc, command(clock, "queued", persistent=True))
    directory.tell(DEVICE, queued.message)
    run(clock)
    assert queued.reply.result.response == {"rpcId": str(queued.command.rpc_id)}

    table.down = True
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    run(clock)
    assert session.sent == []  # write-ahead: SENT is not stored yet, so nothing reaches the device

    # A lightweight command needs no database: it goes to the connected device and its answer comes back.
    light = Asked(directory, m.SubmitRpc, command(clock, "light"))
    directory.tell(DEVICE, light.message)
    run(clock)
    assert [method for _, method in session.sent] == ["light"]
    request_id = session.sent[0][0]
    directory.tell(DEVICE, m.CommandAnswered(1, request_id, b'{"ok":true}'))
    run(clock)
    assert light.reply.result.response == {"ok": True}

    # A new persistent command is refused with 503 and dropped: no rpcId for a command that is not stored.
    refused = Asked(directory, m.SubmitRpc, command(clock, "refused", persistent=True))
    directory.tell(DEVICE, refused.message)
    run(clock)
    error = settle(refused.reply)
    assert error.check(ServiceUnavailable) and error.value.retry_after == 7
    assert refused.command.rpc_id not in table.rows

    table.come_back()
    run(clock)
    run(clock)
    assert [method for _, method in session.sent] == ["light", "queued"]  # same session: no reconnect
    assert table.rows[queued.command.rpc_id] is RpcStatus.SENT
    directory.tell(DEVICE, m.CommandAcked(1, session.sent[1][0]))
    run(clock)
    run(clock)
    assert table.rows[queued.command.rpc_id] is RpcStatus.DELIVERED
    inspect = Asked(directory, m.Inspect)
    directory.tell(DEVICE, inspect.message)
    run(clock)
    assert [status for _, status in inspect.reply.result["pending"]] == ["DELIVERED"]


def test_a_command_refused_for_the_outage_can_be_submitted_again_once_the_database_is_back(clock):
    table = Table()
    directory = directory_on(clock, journal=RpcJournal(table, clock))  # type: ignore[arg-type]
    session = FakeSession(1, Delivery.AWAITING_ACK)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    table.down = True
    same = command(clock, "again", persistent=True)
    first = Asked(directory, m.SubmitRpc, same)
    directory.tell(DEVICE, first.message)
    run(clock)
    assert settle(first.reply).check(ServiceUnavailable)
    table.come_back()
    run(clock)
    second = Asked(directory, m.SubmitRpc, same)
    directory.tell(DEVICE, second.message)
    run(clock)
    run(clock)
    assert second.reply.result.response == {"rpcId": str(same.rpc_id)}
    assert table.rows[same.rpc_id] is RpcStatus.SENT and [method for _, method in session.sent] == ["again"]


# --- the repository: a real SQLite database that goes away ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_repository_answers_503_while_its_database_is_gone_and_finds_it_back_by_itself(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    repository = Repository(f"sqlite:///{folder / 'nanoiot.db'}", retry_after=3, probe_interval=0.05)
    await repository.start()
    try:
        await repository.ping()
        assert repository.healthy and repository.failing_since is None and repository.last_success is not None
        # The database goes away: its directory is moved and the open connection closed.
        folder.rename(tmp_path / "elsewhere")
        repository._engine.dispose()  # type: ignore[union-attr]
        with pytest.raises(DatabaseUnavailable) as caught:
            await repository.count_users()
        assert caught.value.http_status == 503 and caught.value.headers() == {b"retry-after": b"3"}
        assert "nanoiot.db" not in caught.value.message and str(tmp_path) not in caught.value.message
        assert not repository.healthy and repository.failing_since is not None
        with pytest.raises(ServiceUnavailable):
            await repository.ping()
        back = repository.when_healthy()
        assert not back.called
        # It comes back: the repository's own probe notices, with no query from anyone.
        (tmp_path / "elsewhere").rename(folder)
        await bounded(back, 10, "the probe to find the database back")
        assert repository.healthy and repository.failing_since is None
        assert await repository.count_users() == 0
    finally:
        await repository.stop()


@pytest_twisted.ensureDeferred
async def test_the_503_of_an_unreachable_postgresql_names_no_host_or_port(tmp_path):
    repository = Repository(f"sqlite:///{tmp_path / 'nanoiot.db'}", probe_interval=0.05)
    await repository.start()
    try:
        refused = OperationalError("SELECT 1", {}, Exception(
            'connection to server at "db.internal" (10.0.0.5), port 5432 failed: Connection refused'))

        def query(conn: Any) -> None:
            raise refused

        with pytest.raises(DatabaseUnavailable) as caught:
            await repository._run(query)
        body = caught.value.to_json(0)
        assert body["status"] == 503 and "5432" not in str(body) and "db.internal" not in str(body)
        assert caught.value.__cause__ is refused  # kept for the log
        await bounded(repository.when_healthy(), 10, "the probe to succeed on a database that never left")
    finally:
        await repository.stop()


# --- the doors: a token lookup that finds the database gone -----------------------------------------------------------

class UnreachableDevices:
    """The catalog's repository during an outage: every device lookup fails as the repository reports it."""

    def get_devices_by_tokens(self, tokens: list) -> Deferred:
        return fail(DatabaseUnavailable(retry_after=7))


@pytest.mark.parametrize("level, code", [(4, codec.CONNACK_SERVER_UNAVAILABLE), (5, codec.REASON_SERVER_UNAVAILABLE)])
def test_an_mqtt_connect_whose_token_cannot_be_checked_gets_server_unavailable_not_not_authorized(level, code):
    mqtt = MqttHarness()
    catalog = DeviceCatalog(UnreachableDevices(), clock=mqtt.clock)  # type: ignore[arg-type]
    mqtt.factory.authenticate = catalog.device_for_token
    mqtt.level = level
    mqtt.feed(codec.encode_connect("", protocol_level=level, username="UNSEEN", keep_alive=60))
    mqtt.clock.advance(0)
    [connack] = mqtt.written_packets(level)
    assert connack.reason_code == code and mqtt.closed and mqtt.sessions == []


def test_a_coap_request_whose_token_cannot_be_checked_gets_5_03_with_max_age():
    harness = CoapHarness()
    try:
        harness.pending_lookup = Deferred()
        harness.request(coap.POST, harness.rpc_path("1"), payload=b"{}")
        harness.pending_lookup.errback(DatabaseUnavailable(retry_after=7))
        [reply] = harness.take()
        assert reply.code == coap.SERVICE_UNAVAILABLE
        assert coap.option_value(reply, coap.MAX_AGE) == 7
    finally:
        harness.stop()


# --- a cluster node taking a device over during the outage ------------------------------------------------------------

class Outage(Health):
    """One node's view of a database that is down: claims and loads fail as the repository reports it, and
    ``when_healthy`` fires when it comes back."""

    def __init__(self, store: Any, repository: Any) -> None:
        self.store = store
        self.repository = repository
        self.down = True
        self._waiting: list[Deferred] = []

    def claim_devices(self, node_id: str, device_ids: list) -> Deferred:
        return fail(DatabaseUnavailable()) if self.down else self.store.claim_devices(node_id, device_ids)

    def load_device_active_rpcs(self, device_id: Any) -> Deferred:
        return fail(DatabaseUnavailable()) if self.down else self.repository.load_device_active_rpcs(device_id)


    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_cluster_node_that_could_not_claim_or_load_a_device_does_both_once_the_database_is_back(clock):
    cluster = Cluster(clock, ("A",))
    a = cluster.A
    device = cluster.device()
    stored = cluster.stored(device, "waiting")
    outage = Outage(a.port.store, a.port.repository)
    a.port.store = a.port.repository = outage
    session = a.connect(device)
    cluster.run()
    assert session.sent == [] and session.closed == []  # served unclaimed, without its stored commands
    assert device.id not in cluster.store.rows
    outage.come_back()
    cluster.run()
    cluster.run()
    assert cluster.store.rows[device.id] == ("A", 1)  # claimed after all
    assert session.methods == ["waiting"] and session.closed == []  # on the same session: no reconnect
    session.answer("waiting", b'"done"')
    cluster.run()
    assert cluster.table.status(stored.id) is RpcStatus.SUCCESSFUL
    cluster.assert_quiet()
