"""The repository on real databases: every test that takes ``repository`` or ``database_url`` runs on SQLite and on
PostgreSQL (see tests/fixtures/database.py)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_twisted
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from twisted.internet import defer, reactor, threads
from twisted.python import threadable

from nanoiot.errors import BadRequest, ConfigError, Conflict, InvalidArguments, NotFound
from nanoiot.persistence import schema
from nanoiot.persistence.errors import DatabaseUnavailable
from nanoiot.persistence.records import (
    NULL_UUID,
    Authority,
    Device,
    PageLink,
    RpcRecord,
    RpcStatus,
    SortOrder,
)
from nanoiot.persistence.repository import ACTIVE_RPCS_QUERY, UNCHANGED, Repository

T0 = 1_700_000_000_000  # epoch ms of the controlled clock


class ClockedReactor:
    """The real reactor (threads, callbacks) with a clock the test sets, so ``created_time`` values are known."""

    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def seconds(self) -> float:
        return self.now_ms / 1000

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


@pytest.fixture
def clock() -> ClockedReactor:
    return ClockedReactor()


@pytest_twisted.async_yield_fixture
async def timed(database_url: str, clock: ClockedReactor) -> Any:
    """A repository whose ``created_time`` comes from ``clock``."""
    repo = Repository(database_url, clock)
    await repo.start()
    yield repo
    await repo.stop()


def link(page_size: int = 100, page: int = 0, text_search: str | None = None, sort_property: str | None = None,
         sort_order: SortOrder = SortOrder.ASC) -> PageLink:
    return PageLink(page_size, page, text_search, sort_property, sort_order)


def names(page: Any) -> list[str]:
    return [d.name for d in page.data]


def make_rpc(tenant_id: UUID, device_id: UUID, created_time: int = T0, method: str = "setGpio",
             status: RpcStatus = RpcStatus.QUEUED, expiration_time: int | None = None, params: Any = None,
             response: Any = None, **fields: Any) -> RpcRecord:
    return RpcRecord(uuid4(), created_time, tenant_id, device_id,
                     expiration_time if expiration_time is not None else created_time + 60_000, False, method,
                     params if params is not None else {"pin": 7}, status, response, **fields)


async def new_device(repo: Repository, tenant_id: UUID, name: str, **kwargs: Any) -> Device:
    created, _ = await repo.create_device(tenant_id, name, **kwargs)
    return created


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# --- schema ---------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_starting_again_on_the_same_database_keeps_schema_and_rows(database_url):
    first = Repository(database_url)
    await first.start()
    tenant = await first.create_tenant("Acme")
    await first.stop()

    second = Repository(database_url)
    await second.start()
    try:
        assert await second.get_tenant(tenant.id) == tenant
        assert await second.get_schema_revision() == schema.head_revision()
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_a_database_written_by_a_newer_nanoiot_is_refused_with_a_config_error(database_url):
    repo = Repository(database_url)
    await repo.start()
    await repo.stop()

    def bump_version() -> None:
        engine = create_engine(database_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        engine.dispose()

    await threads.deferToThread(bump_version)
    again = Repository(database_url)
    with pytest.raises(ConfigError, match="newer"):
        await again.start()


# --- tenants, customers, users --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_tenant_reads_back_as_created(timed):
    tenant = await timed.create_tenant("Acme")
    assert tenant.title == "Acme"
    assert tenant.created_time == T0
    assert await timed.get_tenant(tenant.id) == tenant
    assert await timed.get_tenant(uuid4()) is None


@pytest_twisted.ensureDeferred
async def test_a_customer_reads_back_and_its_title_can_change(repository):
    tenant = await repository.create_tenant("Acme")
    customer = await repository.create_customer(tenant.id, "Customer A")
    assert await repository.get_customer(customer.id) == customer
    renamed = await repository.update_customer(replace(customer, title="Customer B"))
    assert renamed == replace(customer, title="Customer B")
    assert await repository.get_customer(customer.id) == renamed
    assert await repository.get_customer(uuid4()) is None


@pytest_twisted.ensureDeferred
async def test_customer_titles_are_unique_within_a_tenant_only(repository):
    acme = await repository.create_tenant("Acme")
    other = await repository.create_tenant("Other")
    first = await repository.create_customer(acme.id, "Customer A")
    with pytest.raises(BadRequest, match="Customer with such title already exists!"):
        await repository.create_customer(acme.id, "Customer A")
    await repository.create_customer(other.id, "Customer A")
    second = await repository.create_customer(acme.id, "Customer B")
    with pytest.raises(BadRequest, match="Customer with such title already exists!"):
        await repository.update_customer(replace(second, title=first.title))


@pytest_twisted.ensureDeferred
async def test_updating_a_missing_customer_is_not_found(repository):
    tenant = await repository.create_tenant("Acme")
    customer = await repository.create_customer(tenant.id, "A")
    with pytest.raises(NotFound):
        await repository.update_customer(replace(customer, id=uuid4()))


@pytest_twisted.ensureDeferred
async def test_a_user_reads_back_by_id_and_by_email_in_any_case(repository):
    tenant = await repository.create_tenant("Acme")
    user = await repository.create_user("Tenant@NanoIoT.io", b"$2b$hash", Authority.TENANT_ADMIN, tenant.id,
                                        NULL_UUID, "Ada", "Lovelace")
    assert await repository.get_user(user.id) == user
    assert await repository.get_user_by_email("tenant@nanoiot.io") == user
    assert await repository.get_user_by_email("TENANT@NANOIOT.IO") == user
    assert await repository.get_user_by_email("nobody@nanoiot.io") is None
    assert await repository.get_user(uuid4()) is None
    found = await repository.get_user(user.id)
    assert (found.email, found.authority, found.password_hash) == ("Tenant@NanoIoT.io", Authority.TENANT_ADMIN,
                                                                   b"$2b$hash")


@pytest_twisted.ensureDeferred
async def test_an_email_already_present_in_another_case_is_a_bad_request(repository):
    await repository.create_user("tenant@nanoiot.io", b"h", Authority.TENANT_ADMIN, uuid4(), NULL_UUID)
    with pytest.raises(BadRequest) as info:
        await repository.create_user("TENANT@nanoiot.io", b"h", Authority.TENANT_ADMIN, uuid4(), NULL_UUID)
    assert info.value.message == "User with email 'TENANT@nanoiot.io' already present in database!"
    assert await repository.count_users() == 1


@pytest_twisted.ensureDeferred
async def test_count_users_counts_every_user(repository):
    assert await repository.count_users() == 0
    await repository.create_user("sysadmin@nanoiot.io", b"h", Authority.SYS_ADMIN, NULL_UUID, NULL_UUID)
    await repository.create_user("customer@nanoiot.io", b"h", Authority.CUSTOMER_USER, uuid4(), uuid4())
    assert await repository.count_users() == 2


# --- devices and credentials ----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_device_is_created_with_a_generated_access_token(timed):
    tenant = await timed.create_tenant("Acme")
    device, credentials = await timed.create_device(tenant.id, "Thermostat", "thermostat", "Kitchen")
    assert (device.tenant_id, device.customer_id, device.name, device.type, device.label, device.version) == (
        tenant.id, NULL_UUID, "Thermostat", "thermostat", "Kitchen", 1)
    assert device.created_time == credentials.created_time == T0
    assert credentials.device_id == device.id
    assert credentials.credentials_type == "ACCESS_TOKEN"
    assert credentials.credentials_value is None
    assert len(credentials.credentials_id) == 20 and credentials.credentials_id.isalnum()
    assert await timed.get_device(device.id) == device
    assert await timed.get_credentials(device.id) == credentials
    assert await timed.get_device(uuid4()) is None
    assert await timed.get_credentials(uuid4()) is None


@pytest_twisted.ensureDeferred
async def test_generated_tokens_differ(repository):
    tenant = await repository.create_tenant("Acme")
    tokens = {(await repository.create_device(tenant.id, f"d{i}"))[1].credentials_id for i in range(5)}
    assert len(tokens) == 5


@pytest_twisted.ensureDeferred
async def test_a_device_keeps_the_access_token_it_was_given(repository):
    tenant = await repository.create_tenant("Acme")
    device, credentials = await repository.create_device(tenant.id, "Lamp", access_token="MY_TOKEN")
    assert credentials.credentials_id == "MY_TOKEN"
    assert await repository.get_device_by_token("MY_TOKEN") == device


@pytest_twisted.ensureDeferred
async def test_additional_info_reads_back_exactly(repository):
    tenant = await repository.create_tenant("Acme")
    info = {"description": "Zähler ☃", "nested": [1, 2.5, None, True, {"x": "\u0000"}], "big": 2 ** 62,
            "float": 0.1 + 0.2}
    device = await new_device(repository, tenant.id, "Meter", additional_info=info)
    assert (await repository.get_device(device.id)).additional_info == info


@pytest_twisted.ensureDeferred
async def test_device_names_are_unique_within_a_tenant_but_not_across_tenants(repository):
    acme = await repository.create_tenant("Acme")
    other = await repository.create_tenant("Other")
    first = await new_device(repository, acme.id, "Thermostat")
    with pytest.raises(BadRequest) as info:
        await repository.create_device(acme.id, "Thermostat")
    assert info.value.message == "Device with such name already exists!"
    elsewhere = await new_device(repository, other.id, "Thermostat")
    assert elsewhere.id != first.id
    page = await repository.list_tenant_devices(acme.id, link())
    assert [d.id for d in page.data] == [first.id]


@pytest_twisted.ensureDeferred
async def test_an_access_token_belongs_to_one_device_only(repository):
    tenant = await repository.create_tenant("Acme")
    await repository.create_device(tenant.id, "First", access_token="SHARED")
    with pytest.raises(BadRequest) as info:
        await repository.create_device(tenant.id, "Second", access_token="SHARED")
    assert info.value.message == "Device credentials are already assigned to another device!"
    # Device and credentials are one transaction: the rejected device was not left behind without a token.
    assert await repository.get_tenant_device_by_name(tenant.id, "Second") is None


@pytest_twisted.ensureDeferred
async def test_a_device_is_found_by_its_token_and_only_by_it(repository):
    tenant = await repository.create_tenant("Acme")
    device, credentials = await repository.create_device(tenant.id, "Lamp")
    await repository.create_device(tenant.id, "Other lamp")
    assert await repository.get_device_by_token(credentials.credentials_id) == device
    assert await repository.get_device_by_token("no-such-token") is None
    assert await repository.get_device_by_token(credentials.credentials_id.lower() + "x") is None


@pytest_twisted.ensureDeferred
async def test_new_credentials_replace_the_old_token(repository):
    tenant = await repository.create_tenant("Acme")
    device, old = await repository.create_device(tenant.id, "Lamp")
    new = await repository.update_credentials(device.id, "NEW_TOKEN")
    assert (new.id, new.credentials_id, new.version) == (old.id, "NEW_TOKEN", old.version + 1)
    assert await repository.get_credentials(device.id) == new
    assert await repository.get_device_by_token("NEW_TOKEN") == device
    assert await repository.get_device_by_token(old.credentials_id) is None


@pytest_twisted.ensureDeferred
async def test_new_credentials_may_not_take_another_devices_token(repository):
    tenant = await repository.create_tenant("Acme")
    device, _ = await repository.create_device(tenant.id, "Lamp", access_token="LAMP")
    await repository.create_device(tenant.id, "Fan", access_token="FAN")
    with pytest.raises(BadRequest, match="Device credentials are already assigned to another device!"):
        await repository.update_credentials(device.id, "FAN")
    assert (await repository.get_credentials(device.id)).credentials_id == "LAMP"
    with pytest.raises(NotFound):
        await repository.update_credentials(uuid4(), "ANY")


@pytest_twisted.ensureDeferred
async def test_updating_a_device_stores_its_fields_and_bumps_its_version(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    changed = replace(device, name="Lamp 2", type="lamp", label="Hall", additional_info={"floor": 1})
    updated = await repository.update_device(changed)
    assert updated == replace(changed, version=2)
    assert await repository.get_device(device.id) == updated


@pytest_twisted.ensureDeferred
async def test_updating_a_device_from_a_stale_copy_is_a_conflict(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    await repository.update_device(replace(device, label="first"))
    with pytest.raises(Conflict):
        await repository.update_device(replace(device, label="second"))
    assert (await repository.get_device(device.id)).label == "first"
    with pytest.raises(NotFound):
        await repository.update_device(replace(device, id=uuid4()))


@pytest_twisted.ensureDeferred
async def test_renaming_a_device_to_a_taken_name_is_a_bad_request(repository):
    tenant = await repository.create_tenant("Acme")
    await new_device(repository, tenant.id, "Lamp")
    fan = await new_device(repository, tenant.id, "Fan")
    with pytest.raises(BadRequest, match="Device with such name already exists!"):
        await repository.update_device(replace(fan, name="Lamp"))


@pytest_twisted.ensureDeferred
async def test_a_device_is_found_by_its_exact_name_within_its_tenant(repository):
    acme = await repository.create_tenant("Acme")
    other = await repository.create_tenant("Other")
    device = await new_device(repository, acme.id, "Lamp")
    assert await repository.get_tenant_device_by_name(acme.id, "Lamp") == device
    assert await repository.get_tenant_device_by_name(acme.id, "lamp") is None
    assert await repository.get_tenant_device_by_name(other.id, "Lamp") is None


@pytest_twisted.ensureDeferred
async def test_deleting_a_device_deletes_its_credentials_and_rpcs(repository):
    tenant = await repository.create_tenant("Acme")
    device, credentials = await repository.create_device(tenant.id, "Lamp")
    other = await new_device(repository, tenant.id, "Fan")
    kept = await repository.insert_rpcs([make_rpc(tenant.id, other.id)])
    await repository.insert_rpcs([make_rpc(tenant.id, device.id), make_rpc(tenant.id, device.id)])

    assert await repository.delete_device(device.id) is True
    assert await repository.get_device(device.id) is None
    assert await repository.get_credentials(device.id) is None
    assert await repository.get_device_by_token(credentials.credentials_id) is None
    assert (await repository.list_device_rpcs(device.id, link(), None)).total_elements == 0
    assert await repository.get_rpc(kept[0].id) == kept[0]
    assert await repository.delete_device(device.id) is False
    # The name is free again.
    await repository.create_device(tenant.id, "Lamp", access_token=credentials.credentials_id)


# --- device pages ---------------------------------------------------------------------------------------------------

#: (name, type, label) in creation order, one second apart: every sort column orders them differently.
FLEET = [
    ("charlie", "sensor", "c-label"),
    ("alpha", "lamp", None),
    ("echo", "valve", "a-label"),
    ("bravo", "meter", "b-label"),
    ("delta", "gateway", "d-label"),
]
BY_CREATED = ["charlie", "alpha", "echo", "bravo", "delta"]


async def create_fleet(repo: Repository, clock: ClockedReactor, tenant_id: UUID, **kwargs: Any) -> list[Device]:
    devices = []
    for name, device_type, label in FLEET:
        clock.now_ms += 1000
        devices.append(await new_device(repo, tenant_id, name, type=device_type, label=label, **kwargs))
    return devices


@pytest_twisted.ensureDeferred
async def test_device_pages_count_every_match_and_say_whether_more_follow(timed, clock):
    tenant = await timed.create_tenant("Acme")
    await create_fleet(timed, clock, tenant.id)
    first = await timed.list_tenant_devices(tenant.id, link(page_size=2))
    assert (names(first), first.total_elements, first.total_pages, first.has_next) == (BY_CREATED[:2], 5, 3, True)
    second = await timed.list_tenant_devices(tenant.id, link(page_size=2, page=1))
    assert (names(second), second.has_next) == (BY_CREATED[2:4], True)
    last = await timed.list_tenant_devices(tenant.id, link(page_size=2, page=2))
    assert (names(last), last.total_elements, last.has_next) == (BY_CREATED[4:], 5, False)
    beyond = await timed.list_tenant_devices(tenant.id, link(page_size=2, page=3))
    assert (names(beyond), beyond.total_elements, beyond.has_next) == ([], 5, False)


@pytest_twisted.ensureDeferred
async def test_device_pages_hold_only_the_tenants_devices(timed, clock):
    acme = await timed.create_tenant("Acme")
    other = await timed.create_tenant("Other")
    await create_fleet(timed, clock, acme.id)
    await new_device(timed, other.id, "foreign")
    page = await timed.list_tenant_devices(other.id, link())
    assert (names(page), page.total_elements) == (["foreign"], 1)


@pytest_twisted.ensureDeferred
async def test_text_search_matches_part_of_the_name_in_any_case(timed, clock):
    tenant = await timed.create_tenant("Acme")
    await create_fleet(timed, clock, tenant.id)
    assert names(await timed.list_tenant_devices(tenant.id, link(text_search="ALP"))) == ["alpha"]
    page = await timed.list_tenant_devices(tenant.id, link(text_search="a", page_size=2))
    assert (names(page), page.total_elements) == (["charlie", "alpha"], 4)
    assert names(await timed.list_tenant_devices(tenant.id, link(text_search="Harl"))) == ["charlie"]


@pytest_twisted.ensureDeferred
async def test_text_search_treats_wildcards_as_plain_characters(repository):
    tenant = await repository.create_tenant("Acme")
    await new_device(repository, tenant.id, "100% done")
    await new_device(repository, tenant.id, "plain")
    await new_device(repository, tenant.id, "under_score")
    assert names(await repository.list_tenant_devices(tenant.id, link(text_search="%"))) == ["100% done"]
    assert names(await repository.list_tenant_devices(tenant.id, link(text_search="_"))) == ["under_score"]
    assert names(await repository.list_tenant_devices(tenant.id, link(text_search="\\"))) == []


@pytest.mark.parametrize("sort_property, ascending", [
    ("createdTime", BY_CREATED),
    ("name", ["alpha", "bravo", "charlie", "delta", "echo"]),
    # No label sorts last in ascending order and first in descending order, on both databases.
    ("label", ["echo", "bravo", "charlie", "delta", "alpha"]),
    ("type", ["delta", "alpha", "bravo", "charlie", "echo"]),
])
@pytest.mark.parametrize("order", [SortOrder.ASC, SortOrder.DESC])
@pytest_twisted.ensureDeferred
async def test_devices_sort_by_each_sort_property_both_ways(timed, clock, sort_property, ascending, order):
    tenant = await timed.create_tenant("Acme")
    await create_fleet(timed, clock, tenant.id)
    page = await timed.list_tenant_devices(tenant.id, link(sort_property=sort_property, sort_order=order))
    expected = ascending if order is SortOrder.ASC else list(reversed(ascending))
    assert names(page) == expected


@pytest_twisted.ensureDeferred
async def test_devices_created_in_the_same_millisecond_page_by_id_without_overlap(timed):
    tenant = await timed.create_tenant("Acme")
    created = [await new_device(timed, tenant.id, f"d{i}") for i in range(6)]
    by_id = sorted(d.id.hex for d in created)
    pages = [await timed.list_tenant_devices(tenant.id, link(page_size=2, page=p)) for p in range(3)]
    assert [d.id.hex for page in pages for d in page.data] == by_id
    descending = await timed.list_tenant_devices(tenant.id, link(sort_property="createdTime",
                                                                 sort_order=SortOrder.DESC))
    assert [d.id.hex for d in descending.data] == list(reversed(by_id))


@pytest_twisted.ensureDeferred
async def test_an_unknown_sort_property_is_invalid_and_named(repository):
    tenant = await repository.create_tenant("Acme")
    with pytest.raises(InvalidArguments, match="customerTitle"):
        await repository.list_tenant_devices(tenant.id, link(sort_property="customerTitle"))


@pytest.mark.parametrize("page_size, page", [(0, 0), (-1, 0), (10, -1)])
@pytest_twisted.ensureDeferred
async def test_a_page_size_below_one_or_a_negative_page_is_invalid(repository, page_size, page):
    tenant = await repository.create_tenant("Acme")
    with pytest.raises(InvalidArguments):
        await repository.list_tenant_devices(tenant.id, link(page_size=page_size, page=page))


@pytest_twisted.ensureDeferred
async def test_tenant_devices_filter_by_type(timed, clock):
    tenant = await timed.create_tenant("Acme")
    await create_fleet(timed, clock, tenant.id)
    await new_device(timed, tenant.id, "another lamp", type="lamp")
    page = await timed.list_tenant_devices(tenant.id, link(sort_property="name"), "lamp")
    assert (names(page), page.total_elements) == (["alpha", "another lamp"], 2)


# --- customers' devices ---------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_assigning_a_device_moves_it_to_the_customers_list(timed, clock):
    tenant = await timed.create_tenant("Acme")
    a = await timed.create_customer(tenant.id, "A")
    b = await timed.create_customer(tenant.id, "B")
    fleet = await create_fleet(timed, clock, tenant.id)
    charlie, alpha, echo = fleet[:3]
    assigned = await timed.assign_device(charlie.id, a.id)
    assert (assigned.customer_id, assigned.version) == (a.id, charlie.version + 1)
    assert await timed.get_device(charlie.id) == assigned
    await timed.assign_device(alpha.id, a.id)
    await timed.assign_device(echo.id, b.id)

    page = await timed.list_customer_devices(tenant.id, a.id, link())
    assert (names(page), page.total_elements) == (["charlie", "alpha"], 2)
    assert names(await timed.list_customer_devices(tenant.id, a.id, link(text_search="ALPHA"))) == ["alpha"]
    assert names(await timed.list_customer_devices(tenant.id, a.id, link(sort_property="name"))) == [
        "alpha", "charlie"]
    assert names(await timed.list_customer_devices(tenant.id, b.id, link())) == ["echo"]


@pytest_twisted.ensureDeferred
async def test_unassigning_a_device_takes_it_off_the_customers_list(repository):
    tenant = await repository.create_tenant("Acme")
    customer = await repository.create_customer(tenant.id, "A")
    device = await new_device(repository, tenant.id, "Lamp", customer_id=customer.id)
    assert names(await repository.list_customer_devices(tenant.id, customer.id, link())) == ["Lamp"]
    unassigned = await repository.assign_device(device.id, NULL_UUID)
    assert (unassigned.customer_id, unassigned.version) == (NULL_UUID, 2)
    page = await repository.list_customer_devices(tenant.id, customer.id, link())
    assert (page.data, page.total_elements) == ([], 0)


@pytest_twisted.ensureDeferred
async def test_a_customer_list_never_shows_another_tenants_devices(repository):
    acme = await repository.create_tenant("Acme")
    other = await repository.create_tenant("Other")
    customer = await repository.create_customer(acme.id, "A")
    await new_device(repository, other.id, "Foreign", customer_id=customer.id)
    assert (await repository.list_customer_devices(acme.id, customer.id, link())).data == []


@pytest_twisted.ensureDeferred
async def test_assigning_a_missing_device_is_not_found(repository):
    with pytest.raises(NotFound):
        await repository.assign_device(uuid4(), NULL_UUID)


# --- RPCs -----------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_inserted_rpcs_get_increasing_seqs_in_list_order(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    first = await repository.insert_rpcs([make_rpc(tenant.id, device.id, method=f"m{i}") for i in range(3)])
    second = await repository.insert_rpcs([make_rpc(tenant.id, device.id, method=f"m{i}") for i in range(3, 5)])
    seqs = [r.seq for r in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] > 0
    page = await repository.list_device_rpcs(device.id, link(), None)
    assert [r.method for r in page.data] == ["m0", "m1", "m2", "m3", "m4"]
    assert await repository.insert_rpcs([]) == []


@pytest_twisted.ensureDeferred
async def test_concurrent_inserts_never_share_a_seq(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    batches = await defer.gatherResults([
        repository.insert_rpcs([make_rpc(tenant.id, device.id) for _ in range(5)]) for _ in range(8)])
    seqs = [r.seq for batch in batches for r in batch]
    assert len(set(seqs)) == 40
    for batch in batches:
        assert [r.seq for r in batch] == sorted(r.seq for r in batch)


@pytest_twisted.ensureDeferred
async def test_an_rpc_reads_back_with_every_field(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    record = RpcRecord(uuid4(), T0, tenant.id, device.id, T0 + 10_000, True, "setGpio",
                       {"pin": 7, "levels": [0.5, None, "ü"]}, RpcStatus.QUEUED, None, {"note": "x"}, 3, uuid4())
    [stored] = await repository.insert_rpcs([record])
    assert stored == replace(record, seq=stored.seq)
    assert await repository.get_rpc(record.id) == stored
    assert await repository.get_rpc(uuid4()) is None


@pytest_twisted.ensureDeferred
async def test_rpc_params_of_any_json_type_read_back_exactly(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    values = ["text", 7, 1.25, True, [1, "two"], {"a": {"b": None}}]
    stored = await repository.insert_rpcs([make_rpc(tenant.id, device.id, params=v) for v in values])
    assert [(await repository.get_rpc(r.id)).params for r in stored] == values


@pytest_twisted.ensureDeferred
async def test_status_changes_apply_in_one_batch_and_fold_per_rpc(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    a, b, c = await repository.insert_rpcs([make_rpc(tenant.id, device.id) for _ in range(3)])
    await repository.update_rpc_statuses([(c.id, RpcStatus.SENT, {"early": True}, None, None)])
    await repository.update_rpc_statuses([
        (a.id, RpcStatus.SENT, UNCHANGED, 1, None),
        (b.id, RpcStatus.SENT, UNCHANGED, None, None),
        (a.id, RpcStatus.DELIVERED, UNCHANGED, None, None),
        (a.id, RpcStatus.SUCCESSFUL, {"temperature": 21.5}, None, None),
        (b.id, RpcStatus.FAILED, {"error": "oops"}, 2, None),
        (c.id, RpcStatus.TIMEOUT, UNCHANGED, 4, None),
    ])
    a2, b2, c2 = [await repository.get_rpc(r.id) for r in (a, b, c)]
    assert (a2.status, a2.response, a2.retries) == (RpcStatus.SUCCESSFUL, {"temperature": 21.5}, 1)
    assert (b2.status, b2.response, b2.retries) == (RpcStatus.FAILED, {"error": "oops"}, 2)
    assert (c2.status, c2.response, c2.retries) == (RpcStatus.TIMEOUT, {"early": True}, 4)
    assert (a2.method, a2.params, a2.seq) == (a.method, a.params, a.seq)


@pytest_twisted.ensureDeferred
async def test_retry_attempts_are_stored_and_fold_like_the_other_columns(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    a, b = await repository.insert_rpcs([make_rpc(tenant.id, device.id) for _ in range(2)])
    assert (a.attempts, (await repository.get_rpc(a.id)).attempts) == (0, 0)
    await repository.update_rpc_statuses([
        (a.id, RpcStatus.TIMEOUT, UNCHANGED, None, 1),
        (a.id, RpcStatus.SENT, UNCHANGED, None, None),  # None keeps what the previous change set
        (b.id, RpcStatus.TIMEOUT, UNCHANGED, None, 3),
    ])
    a2, b2 = [await repository.get_rpc(r.id) for r in (a, b)]
    assert (a2.status, a2.attempts, b2.status, b2.attempts) == (RpcStatus.SENT, 1, RpcStatus.TIMEOUT, 3)
    assert [r.attempts for r in await repository.load_active_rpcs()] == [1, 3]


@pytest_twisted.ensureDeferred
async def test_a_response_of_none_clears_the_stored_response(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    [r] = await repository.insert_rpcs([make_rpc(tenant.id, device.id, response={"old": 1})])
    await repository.update_rpc_statuses([(r.id, RpcStatus.QUEUED, None, None, None)])
    assert (await repository.get_rpc(r.id)).response is None
    await repository.update_rpc_statuses([])


@pytest_twisted.ensureDeferred
async def test_deleting_an_rpc_says_whether_it_existed(repository):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    [r] = await repository.insert_rpcs([make_rpc(tenant.id, device.id)])
    assert await repository.delete_rpc(r.id) is True
    assert await repository.get_rpc(r.id) is None
    assert await repository.delete_rpc(r.id) is False


async def create_rpc_history(repo: Repository) -> tuple[UUID, list[RpcRecord]]:
    """Four RPCs of one device whose created, expiration, method and response orders all differ from seq."""
    tenant = await repo.create_tenant("Acme")
    device = await new_device(repo, tenant.id, "Lamp")
    other = await new_device(repo, tenant.id, "Fan")
    records = await repo.insert_rpcs([
        make_rpc(tenant.id, device.id, T0 + 3, "b", RpcStatus.SUCCESSFUL, T0 + 40, response={"v": "c"}),
        make_rpc(tenant.id, device.id, T0 + 1, "d", RpcStatus.QUEUED, T0 + 20),
        make_rpc(tenant.id, device.id, T0 + 4, "a", RpcStatus.SUCCESSFUL, T0 + 10, response={"v": "a"}),
        make_rpc(tenant.id, device.id, T0 + 2, "c", RpcStatus.FAILED, T0 + 30, response={"v": "b"}),
        make_rpc(tenant.id, other.id, T0, "z", RpcStatus.QUEUED),
    ])
    return device.id, records[:4]


@pytest_twisted.ensureDeferred
async def test_device_rpcs_page_in_seq_order_by_default(repository):
    device_id, records = await create_rpc_history(repository)
    first = await repository.list_device_rpcs(device_id, link(page_size=3), None)
    assert ([r.id for r in first.data], first.total_elements, first.has_next) == (
        [r.id for r in records[:3]], 4, True)
    second = await repository.list_device_rpcs(device_id, link(page_size=3, page=1), None)
    assert ([r.id for r in second.data], second.has_next) == ([records[3].id], False)


@pytest_twisted.ensureDeferred
async def test_device_rpcs_filter_by_status(repository):
    device_id, records = await create_rpc_history(repository)
    page = await repository.list_device_rpcs(device_id, link(), RpcStatus.SUCCESSFUL)
    assert ([r.id for r in page.data], page.total_elements) == ([records[0].id, records[2].id], 2)
    assert (await repository.list_device_rpcs(device_id, link(), RpcStatus.EXPIRED)).data == []


@pytest.mark.parametrize("sort_property, ascending", [
    ("createdTime", ["d", "c", "b", "a"]),
    ("expirationTime", ["a", "d", "c", "b"]),
    ("request", ["a", "b", "c", "d"]),
    # The QUEUED one has no response yet: last ascending, first descending.
    ("response", ["a", "c", "b", "d"]),
])
@pytest.mark.parametrize("order", [SortOrder.ASC, SortOrder.DESC])
@pytest_twisted.ensureDeferred
async def test_device_rpcs_sort_by_each_sort_property_both_ways(repository, sort_property, ascending, order):
    device_id, _ = await create_rpc_history(repository)
    page = await repository.list_device_rpcs(device_id, link(sort_property=sort_property, sort_order=order), None)
    expected = ascending if order is SortOrder.ASC else list(reversed(ascending))
    assert [r.method for r in page.data] == expected


@pytest_twisted.ensureDeferred
async def test_device_rpcs_reject_an_unknown_sort_property(repository):
    device_id, _ = await create_rpc_history(repository)
    with pytest.raises(InvalidArguments, match="'name'"):
        await repository.list_device_rpcs(device_id, link(sort_property="name"), None)


async def rpcs_of_two_devices(repository: Any, first: RpcStatus, last: RpcStatus) -> list[RpcRecord]:
    """Six RPCs of two devices, interleaved, the first and the last in the statuses given, four others between."""
    tenant = await repository.create_tenant("Acme")
    d1 = await new_device(repository, tenant.id, "one")
    d2 = await new_device(repository, tenant.id, "two")
    inserted = []
    for device_id, status in [(d2.id, first), (d1.id, RpcStatus.SENT), (d2.id, RpcStatus.SUCCESSFUL),
                              (d1.id, RpcStatus.QUEUED), (d2.id, RpcStatus.DELIVERED), (d1.id, last)]:
        inserted += await repository.insert_rpcs([make_rpc(tenant.id, device_id, status=status)])
    return inserted


@pytest_twisted.ensureDeferred
async def test_active_rpcs_load_grouped_by_device_in_seq_order(repository):
    inserted = await rpcs_of_two_devices(repository, RpcStatus.QUEUED, RpcStatus.EXPIRED)
    loaded = await repository.load_active_rpcs([RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED])
    expected = sorted((r for r in inserted if not r.status.is_terminal), key=lambda r: (r.device_id.hex, r.seq))
    assert loaded == expected
    assert [r.id for r in await repository.load_active_rpcs([RpcStatus.QUEUED])] == [
        r.id for r in expected if r.status is RpcStatus.QUEUED]


@pytest_twisted.ensureDeferred
async def test_every_unfinished_rpc_loads_by_device_through_the_partial_index(repository):
    """At start every command not finished (TIMEOUT too: it may be retried) comes back, each device's in seq order,
    read from ``ix_rpc_active_seq`` alone: no status change moves an entry of any other index (schema 6)."""
    inserted = await rpcs_of_two_devices(repository, RpcStatus.TIMEOUT, RpcStatus.FAILED)
    await repository.update_rpc_statuses([(inserted[1].id, RpcStatus.SUCCESSFUL, UNCHANGED, None, None)])  # leaves it
    expected = sorted((r for r in inserted if not r.status.is_terminal and r.id != inserted[1].id),
                      key=lambda r: (r.device_id.hex, r.seq))
    assert [r.id for r in await repository.load_active_rpcs()] == [r.id for r in expected]

    def plan(conn: Any) -> str:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a few rows: the planner would scan the table
            compiled = ACTIVE_RPCS_QUERY.compile(conn)
            return " ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params))
        compiled = ACTIVE_RPCS_QUERY.compile(conn)
        return " ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled)))

    used = await repository._run(plan)
    if used.startswith("SCAN"):  # SQLite: the index's own order, no sort
        assert used == "SCAN rpc USING INDEX ix_rpc_active_seq", used
        # and the next seq of an insert is the last entry of ix_rpc_seq, not a read of every row
        assert await repository._run(lambda conn: [r[-1] for r in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT coalesce(max(seq), 0) FROM rpc")]) == ["SEARCH rpc USING COVERING INDEX ix_rpc_seq"]
    else:
        assert "ix_rpc_active_seq" in used and "Seq Scan" not in used and "ix_rpc_device" not in used, used


@pytest_twisted.ensureDeferred
async def test_active_rpcs_are_counted_per_device_per_tenant_and_in_all(repository):
    acme = await repository.create_tenant("Acme")
    other = await repository.create_tenant("Other")
    lamp = await new_device(repository, acme.id, "Lamp")
    fan = await new_device(repository, acme.id, "Fan")
    foreign = await new_device(repository, other.id, "Foreign")
    await repository.insert_rpcs([
        make_rpc(acme.id, lamp.id, status=RpcStatus.QUEUED),
        make_rpc(acme.id, lamp.id, status=RpcStatus.SENT),
        make_rpc(acme.id, lamp.id, status=RpcStatus.SUCCESSFUL),
        make_rpc(acme.id, fan.id, status=RpcStatus.DELIVERED),
        make_rpc(acme.id, fan.id, status=RpcStatus.TIMEOUT),  # not terminal: it may still be retried
        make_rpc(acme.id, fan.id, status=RpcStatus.EXPIRED),
        make_rpc(other.id, foreign.id, status=RpcStatus.QUEUED),
        make_rpc(other.id, foreign.id, status=RpcStatus.DELETED),
    ])
    assert await repository.count_active_rpcs(device_id=lamp.id) == 2
    assert await repository.count_active_rpcs(device_id=fan.id) == 2
    assert await repository.count_active_rpcs(tenant_id=acme.id) == 4
    assert await repository.count_active_rpcs(tenant_id=other.id) == 1
    assert await repository.count_active_rpcs() == 5
    assert await repository.count_active_rpcs(device_id=lamp.id, tenant_id=other.id) == 0


@pytest.mark.parametrize("batch", [2, 10000])
@pytest_twisted.ensureDeferred
async def test_clean_up_deletes_only_finished_rpcs_created_before_the_cutoff(repository, batch):
    tenant = await repository.create_tenant("Acme")
    device = await new_device(repository, tenant.id, "Lamp")
    old_finished = [make_rpc(tenant.id, device.id, T0 - 1000 - i, status=s) for i, s in enumerate(
        [RpcStatus.SUCCESSFUL, RpcStatus.EXPIRED, RpcStatus.FAILED, RpcStatus.DELETED, RpcStatus.SUCCESSFUL])]
    old_active = [make_rpc(tenant.id, device.id, T0 - 1000, status=s)
                  for s in (RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED, RpcStatus.TIMEOUT)]
    new_finished = [make_rpc(tenant.id, device.id, T0, status=RpcStatus.SUCCESSFUL)]
    await repository.insert_rpcs(old_finished + old_active + new_finished)

    assert await repository.delete_terminal_rpcs_older_than(T0, batch=batch) == 5
    remaining = await repository.list_device_rpcs(device.id, link(), None)
    assert {r.id for r in remaining.data} == {r.id for r in old_active + new_finished}
    assert await repository.delete_terminal_rpcs_older_than(T0, batch=batch) == 0


# --- start-up failures ----------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_unreachable_postgresql_is_a_config_error_at_once():
    url = f"postgresql+psycopg2://nobody:secret@127.0.0.1:{closed_port()}/nanoiot?connect_timeout=3"
    repo = Repository(url)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        await repo.start()
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "cannot reach the database" in message and "\n" not in message
    assert "secret" not in message  # the password is never printed


@pytest_twisted.ensureDeferred
async def test_a_sqlite_file_that_cannot_be_opened_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot reach the database"):
        await Repository(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'nanoiot.db'}").start()


@pytest.mark.parametrize("url", ["not a url", "mysql://localhost/nanoiot", "postgresql+nosuchdriver://h/db"])
@pytest_twisted.ensureDeferred
async def test_an_invalid_or_unsupported_url_is_a_config_error(url):
    with pytest.raises(ConfigError):
        await Repository(url).start()


@pytest_twisted.ensureDeferred
async def test_queries_before_start_fail_instead_of_blocking():
    with pytest.raises(RuntimeError, match="not started"):
        await Repository("sqlite://").get_tenant(uuid4())


# --- threads and retries ------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_no_database_work_ever_runs_on_the_reactor_thread(database_url):
    seen: list[tuple[threading.Thread, bool]] = []

    def record(*_args: Any) -> None:
        seen.append((threading.current_thread(), threadable.isInIOThread()))

    event.listen(Engine, "connect", record)
    event.listen(Engine, "before_cursor_execute", record)
    try:
        repo = Repository(database_url)
        await repo.start()
        tenant = await repo.create_tenant("Acme")
        device, credentials = await repo.create_device(tenant.id, "Lamp")
        await repo.get_device_by_token(credentials.credentials_id)
        await repo.list_tenant_devices(tenant.id, link())
        await repo.insert_rpcs([make_rpc(tenant.id, device.id)])
        await repo.delete_terminal_rpcs_older_than(T0)
        await repo.stop()
    finally:
        event.remove(Engine, "connect", record)
        event.remove(Engine, "before_cursor_execute", record)
    assert seen
    reactor_thread = threading.current_thread()  # pytest-twisted runs the reactor in the test's thread
    assert all(thread is not reactor_thread and not in_io for thread, in_io in seen)
    if database_url.startswith("sqlite"):
        assert len({thread for thread, _ in seen}) == 1  # SQLite gets exactly one thread


@pytest_twisted.ensureDeferred
async def test_a_sqlite_file_runs_in_wal_mode_with_foreign_keys(tmp_path):
    repo = Repository(f"sqlite:///{tmp_path / 'nanoiot.db'}")
    await repo.start()
    try:
        def pragmas(conn: Any) -> tuple[Any, ...]:
            return tuple(conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                         for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout"))

        assert await repo._run(pragmas) == ("wal", 1, 1, 5000)  # synchronous 1 is NORMAL
    finally:
        await repo.stop()


@pytest_twisted.ensureDeferred
async def test_an_in_memory_sqlite_database_keeps_its_rows_between_queries():
    repo = Repository("sqlite://")
    await repo.start()
    try:
        tenant = await repo.create_tenant("Acme")
        assert await repo.get_tenant(tenant.id) == tenant
    finally:
        await repo.stop()


def failing(errors: list[Exception], result: Any = "done") -> Any:
    calls: list[int] = []

    def thd(conn: Any) -> Any:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return thd, calls


def operational(message: str) -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception(message))


@pytest_twisted.ensureDeferred
async def test_a_locked_database_is_retried_until_it_frees(repository):
    thd, calls = failing([operational("database is locked"), operational("database is locked")])
    assert await repository._run(thd) == "done"
    assert len(calls) == 3


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_is_retried(repository):
    thd, calls = failing([operational("server closed the connection unexpectedly")])
    assert await repository._run(thd) == "done"
    assert len(calls) == 2


@pytest_twisted.ensureDeferred
async def test_retries_stop_after_a_few_attempts(repository):
    thd, calls = failing([operational("database is locked")] * 10)
    with pytest.raises(DatabaseUnavailable) as caught:  # then a 503 with Retry-After (see test_db_outage.py)
        await repository._run(thd)
    assert isinstance(caught.value.__cause__, OperationalError)
    assert 1 < len(calls) < 10


@pytest.mark.parametrize("error", [
    operational("no such table: device"),
    IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: x")),
    ValueError("bug"),
])
@pytest_twisted.ensureDeferred
async def test_other_errors_are_never_retried(repository, error):
    thd, calls = failing([error])
    with pytest.raises(type(error)):
        await repository._run(thd)
    assert len(calls) == 1


@pytest_twisted.ensureDeferred
async def test_a_failed_query_rolls_back_its_whole_transaction(repository):
    tenant = await repository.create_tenant("Acme")

    def half_done(conn: Any) -> None:
        conn.execute(text("UPDATE tenant SET title = 'changed'"))
        raise ValueError("fail after the write")

    with pytest.raises(ValueError):
        await repository._run(half_done)
    assert (await repository.get_tenant(tenant.id)).title == "Acme"


@pytest_twisted.ensureDeferred
async def test_a_write_waits_for_another_processs_write_lock_instead_of_failing(tmp_path):
    import sqlite3

    path = tmp_path / "nanoiot.db"
    repo = Repository(f"sqlite:///{path}")
    await repo.start()
    try:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock...
        release = reactor.callLater(0.3, lambda: (other.execute("COMMIT"), other.close()))
        tenant = await repo.create_tenant("Acme")  # ...and ours waits for it (busy_timeout) rather than fail
        assert not release.active()
        assert await repo.get_tenant(tenant.id) == tenant
    finally:
        await repo.stop()


def test_the_constraint_names_the_repository_recognises_exist_in_the_schema():
    names = {c.name for t in schema.metadata.tables.values() for c in [*t.constraints, *t.indexes]}
    assert {schema.DEVICE_NAME_UNIQUE, schema.CREDENTIALS_ID_UNIQUE, schema.USER_EMAIL_UNIQUE,
            schema.CUSTOMER_TITLE_UNIQUE} <= names


@pytest_twisted.ensureDeferred
async def test_starting_a_started_repository_is_refused(repository):
    with pytest.raises(RuntimeError, match="already started"):
        await repository.start()
