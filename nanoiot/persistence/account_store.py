"""Tenants and users as a system or tenant administrator manages them (ThingsBoard's ``/api/tenant``, ``/api/user``).

Built on :meth:`Repository._run` like the other stores (``def thd(conn)``, one transaction, on the repository's
thread pool). Devices are not deleted here: they go through the device catalog (its cache, the cluster's
invalidation) and the device actors, as ``DELETE /api/device`` does; :meth:`AccountStore.delete_tenant` removes what
is left once they are gone.
"""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred

from nanoiot.errors import NotFound
from nanoiot.persistence import schema
from nanoiot.persistence.records import Page, PageLink, Tenant, User
from nanoiot.persistence.repository import (
    Repository,
    _contains_ignoring_case,
    _order_by,
    _page,
    _tenant,
    _translate,
    _user,
)

tenants = schema.tenant
users = schema.tb_user

TENANT_SORTS = {"createdTime": tenants.c.created_time, "title": tenants.c.title}


class AccountStore:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    # --- tenants --------------------------------------------------------------------------------------------------

    def create_tenant(self, title: str) -> Deferred[Tenant]:
        return self.repository.create_tenant(title)

    def get_tenant(self, tenant_id: UUID) -> Deferred[Tenant | None]:
        return self.repository.get_tenant(tenant_id)

    def update_tenant(self, tenant_id: UUID, title: str) -> Deferred[Tenant]:
        """A new title (the one field stored); NotFound if the tenant is gone."""

        def thd(conn: Connection) -> Tenant:
            where = tenants.c.id == tenant_id
            if conn.execute(update(tenants).where(where).values(title=title)).rowcount == 0:
                raise NotFound("Tenant with requested id wasn't found!")
            return _tenant(conn.execute(select(tenants).where(where)).one())

        return self.repository._run(thd)

    def list_tenants(self, link: PageLink) -> Deferred[Page[Tenant]]:
        def thd(conn: Connection) -> Page[Tenant]:
            where = [_contains_ignoring_case(tenants.c.title, link.text_search)] if link.text_search else []
            order = _order_by(link, TENANT_SORTS, tenants.c.created_time, (tenants.c.id,))
            return _page(conn, tenants, where, order, link, _tenant)

        return self.repository._run(thd)

    def tenant_device_ids(self, tenant_id: UUID) -> Deferred[list[UUID]]:
        def thd(conn: Connection) -> list[UUID]:
            return list(conn.scalars(select(schema.device.c.id).where(schema.device.c.tenant_id == tenant_id)))

        return self.repository._run(thd)

    def delete_tenant(self, tenant_id: UUID) -> Deferred[list[UUID]]:
        """The tenant and everything of it still stored (users, customers, rule chains, relations, batches, commands,
        devices not deleted before), in one transaction; returns the ids of the users removed."""

        def thd(conn: Connection) -> list[UUID]:
            user_ids = list(conn.scalars(select(users.c.id).where(users.c.tenant_id == tenant_id)))
            device_ids = select(schema.device.c.id).where(schema.device.c.tenant_id == tenant_id)
            conn.execute(delete(schema.device_credentials).where(
                schema.device_credentials.c.device_id.in_(device_ids)))
            for table in (schema.rpc, schema.rpc_batch, schema.entity_relation, schema.rule_chain, schema.device,
                          schema.customer, users):
                conn.execute(delete(table).where(table.c.tenant_id == tenant_id))
            conn.execute(delete(tenants).where(tenants.c.id == tenant_id))
            return user_ids

        return self.repository._run(thd)

    # --- users ----------------------------------------------------------------------------------------------------

    def get_user(self, user_id: UUID) -> Deferred[User | None]:
        return self.repository.get_user(user_id)

    def update_user(self, user_id: UUID, email: str, first_name: str | None, last_name: str | None) -> Deferred[User]:
        def thd(conn: Connection) -> User:
            where = users.c.id == user_id
            try:
                result = conn.execute(update(users).where(where).values(
                    email=email, first_name=first_name, last_name=last_name))
            except IntegrityError as exc:
                raise _translate(exc, email=email) from None
            if result.rowcount == 0:
                raise NotFound("User with requested id wasn't found!")
            return _user(conn.execute(select(users).where(where)).one())

        return self.repository._run(thd)

    def set_enabled(self, user_id: UUID, enabled: bool) -> Deferred[bool]:
        """False when there is no such user."""

        def thd(conn: Connection) -> bool:
            return conn.execute(update(users).where(users.c.id == user_id).values(enabled=enabled)).rowcount > 0

        return self.repository._run(thd)

    def set_password(self, user_id: UUID, password_hash: bytes, expected_hash: bytes) -> Deferred[bool]:
        """Store a new password hash if the stored one is still ``expected_hash`` (an activation link is used once);
        False otherwise."""

        def thd(conn: Connection) -> bool:
            row = conn.execute(select(users.c.password_hash).where(users.c.id == user_id)).first()
            if row is None or bytes(row.password_hash) != expected_hash:
                return False
            conn.execute(update(users).where(users.c.id == user_id).values(password_hash=password_hash))
            return True

        return self.repository._run(thd)

    def delete_user(self, user_id: UUID) -> Deferred[bool]:
        def thd(conn: Connection) -> bool:
            return conn.execute(delete(users).where(users.c.id == user_id)).rowcount > 0

        return self.repository._run(thd)
