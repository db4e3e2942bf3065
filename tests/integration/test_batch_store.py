"""BatchStore's queries on a real database (SQLite and PostgreSQL): the devices a bulk RPC of a device type targets."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from nanoiot.persistence.batch_store import BatchStore
from nanoiot.persistence.records import NULL_UUID


@pytest_twisted.ensureDeferred
async def test_devices_of_a_type_are_the_tenants_or_the_customers_oldest_first_at_most_the_limit(repository: Any):
    tenant = await repository.create_tenant("t")
    other = await repository.create_tenant("other")
    customer = await repository.create_customer(tenant.id, "c")
    made = []
    for i in range(4):
        device, _ = await repository.create_device(tenant.id, f"d{i}", "meter", label=f"L{i}",
                                                   additional_info={"n": i} if i else None,
                                                   customer_id=customer.id if i % 2 else NULL_UUID)
        made.append(device)
    await repository.create_device(tenant.id, "pump", "pump")
    await repository.create_device(other.id, "d0", "meter")
    store = BatchStore(repository)

    found = await store.devices_of_type(tenant.id, "meter")
    assert found == sorted(made, key=lambda d: (d.created_time, d.id.hex))
    # Devices made in the same millisecond are ordered by id: look them up by id, not by position.
    by_id = {d.id: d for d in found}
    assert by_id[made[1].id].additional_info == {"n": 1} and by_id[made[0].id].additional_info is None
    assert {type(d.id) for d in found} == {type(tenant.id)} and found[0].tenant_id == tenant.id
    assert await store.devices_of_type(tenant.id, "meter", customer.id) == [d for d in found if d.customer_id ==
                                                                           customer.id]
    assert await store.devices_of_type(tenant.id, "meter", limit=2) == found[:2]
    assert await store.devices_of_type(tenant.id, "valve") == []
