"""``/api/tenant``: tenants as ThingsBoard's system administrator manages them (create, rename, list, read, delete).

Deleting a tenant deletes its devices the way ``DELETE /api/device`` does (through the device catalog, so that caches
and other nodes follow, and their actors are told), then everything else of it in one transaction; its users'
tokens stop working at once.
"""

from __future__ import annotations

from typing import Any

from nanoiot.actors import messages as m
from nanoiot.errors import BadRequest, NotFound, PermissionDenied
from nanoiot.persistence.account_store import TENANT_SORTS, AccountStore
from nanoiot.persistence.records import Authority, Tenant
from nanoiot.validation import text, uuid_param
from nanoiot.web.access import require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.devices import _id_of
from nanoiot.web.paging import page_link
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router
from nanoiot.web.shapes import page_json, tenant_json

TENANT_NOT_FOUND = "Tenant with requested id wasn't found!"
#: The column's length, on SQLite as on PostgreSQL.


def tenant_title(body: Any) -> str:
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str) or not title.strip():
        raise BadRequest("Tenant title should be specified!")
    return text("title", title)  # type: ignore[return-value]


class TenantApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        self.store = AccountStore(context.repository)

    def register(self, router: Router) -> None:
        router.add("POST", "/api/tenant", self.save_tenant)
        router.add("GET", "/api/tenants", self.list_tenants)
        router.add("GET", "/api/tenant/{tenantId}", self.get_tenant)
        router.add("DELETE", "/api/tenant/{tenantId}", self.delete_tenant)

    async def _tenant(self, request: ApiRequest) -> Tenant:
        tenant = await self.store.get_tenant(uuid_param("tenantId", request.params["tenantId"]))
        if tenant is None:
            raise NotFound(TENANT_NOT_FOUND)
        return tenant

    async def save_tenant(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.SYS_ADMIN)
        body = request.json_body()
        title = tenant_title(body)
        existing_id = _id_of(body.get("id"))
        if existing_id:
            return tenant_json(await self.store.update_tenant(uuid_param("id", existing_id), title))
        return tenant_json(await self.store.create_tenant(title))

    async def list_tenants(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.SYS_ADMIN)
        page = await self.store.list_tenants(page_link(request, tuple(TENANT_SORTS)))
        return page_json(page, tenant_json)

    async def get_tenant(self, request: ApiRequest) -> dict[str, Any]:
        """The system administrator reads any tenant; a tenant administrator its own (ThingsBoard's rule)."""
        user = request.user
        require_authority(user, Authority.SYS_ADMIN, Authority.TENANT_ADMIN)
        tenant = await self._tenant(request)
        if user.authority is Authority.TENANT_ADMIN and tenant.id != user.tenant_id:
            raise PermissionDenied()
        return tenant_json(tenant)

    async def delete_tenant(self, request: ApiRequest) -> Response:
        require_authority(request.user, Authority.SYS_ADMIN)
        tenant = await self._tenant(request)
        catalog, directory = self.context.catalog, self.context.directory
        for device_id in await self.store.tenant_device_ids(tenant.id):
            device = await catalog.get_device(device_id)
            if device is None:
                continue
            await catalog.delete_device(device.id)
            if directory.existing(device.id) is not None:
                directory.tell(device, m.DeviceRemoved())
        user_ids = await self.store.delete_tenant(tenant.id)
        users = self.context.tokens.users
        if users is not None:
            revoke_before = int(self.context.clock.seconds() * 1000)
            for user_id in user_ids:
                users.changed(user_id, revoke_before)
        if self.context.rules is not None:
            self.context.rules.chains_changed(tenant.id)
        return Response(body=NO_BODY)
