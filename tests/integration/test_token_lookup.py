"""The batched token lookup of a connect storm on real databases (SQLite and PostgreSQL, tests/fixtures/database.py):
the plain-SQL query gives exactly the devices the repository stores, whatever the batch size."""

from __future__ import annotations

import pytest
import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_a_batch_of_tokens_finds_exactly_the_stored_devices_and_nothing_for_unknown_tokens(repository):
    tenant = await repository.create_tenant("Acme")
    customer = await repository.create_customer(tenant.id, "Buyer")
    created = {}
    for i in range(7):
        device, credentials = await repository.create_device(
            tenant.id, f"d{i}", type="meter", label=None if i % 2 else f"label {i}",
            additional_info={"description": "Zähler ☃", "n": i} if i % 3 else None)
        created[credentials.credentials_id] = device
    token = next(iter(created))
    created[token] = await repository.assign_device(created[token].id, customer.id)
    tokens = list(created)

    # 1, 2, 3 (padded to 4), 7 (padded to 8) tokens, with unknown ones and a repeated one among them.
    for batch in ([tokens[0]], tokens[:2], [tokens[2], "nobody", tokens[3]], tokens, tokens + ["x", tokens[1]]):
        found = await repository.get_devices_by_tokens(batch)
        assert found == {t: created[t] for t in batch if t in created}
        for t, device in found.items():
            assert device == await repository.get_device(device.id)
    assert await repository.get_devices_by_tokens([]) == {}
    assert await repository.get_devices_by_tokens(["nobody", "%s", "?", "' OR 1=1 --"]) == {}
    assert (await repository.get_device_by_token(token)).customer_id == customer.id


@pytest_twisted.ensureDeferred
async def test_a_failing_lookup_raises_sqlalchemys_error_and_the_repository_still_answers_afterwards(repository):
    """The query runs on the driver's cursor: a driver error must still arrive wrapped as SQLAlchemy's (what
    ``_run`` retries and the web layer turns into 500/503), and leave the pool usable."""
    from sqlalchemy.exc import DBAPIError

    from nanoiot.persistence.repository import _driver_rows

    def bad(conn):
        return _driver_rows(conn, "SELECT no_such_column FROM device_credentials WHERE credentials_id = "
                            + ("?" if conn.dialect.paramstyle == "qmark" else "%s"), ("x",))

    with pytest.raises(DBAPIError) as caught:
        await repository._run(bad)
    assert not caught.value.connection_invalidated
    assert "no_such_column" in str(caught.value.orig)
    assert await repository.get_devices_by_tokens(["nobody"]) == {}
