"""Devices and customers: enough of ThingsBoard's entity API for its clients to create a device and read its token."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

from nanoiot.actors import messages as m
from nanoiot.errors import BadRequest, InvalidArguments, NotFound, PermissionDenied
from nanoiot.persistence.records import NULL_UUID, Authority, Device
from nanoiot.web.access import SYSADMIN_DENIED, check_device_access, require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.paging import page_link
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router
from nanoiot.web.shapes import credentials_json, customer_json, device_info_json, device_json, page_json
from nanoiot.validation import json_depth, json_object, text, uuid_param

DEVICE_SORTS = ("createdTime", "name", "label", "type")
CUSTOMER_NOT_FOUND = "Customer with requested id wasn't found!"


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    return text(key, body.get(key))


def _name(body: dict[str, Any], key: str, missing: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(missing)
    return text(key, value)  # type: ignore[return-value]


def _id_of(value: Any) -> str | None:
    """An entity id as ThingsBoard sends it: ``{"entityType": ..., "id": ...}`` or a bare string."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


class DeviceApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def register(self, router: Router) -> None:
        router.add("POST", "/api/device", self.save_device)
        router.add("GET", "/api/device/{deviceId}", self.get_device)
        router.add("DELETE", "/api/device/{deviceId}", self.delete_device)
        router.add("GET", "/api/device/{deviceId}/credentials", self.get_credentials)
        router.add("GET", "/api/device/info/{deviceId}", self.get_device_info)
        router.add("GET", "/api/tenant/deviceInfos", self.tenant_device_infos)
        router.add("GET", "/api/customer/{customerId}/deviceInfos", self.customer_device_infos)
        router.add("GET", "/api/tenant/devices", self.tenant_devices)
        router.add("GET", "/api/tenant/device", self.tenant_device_by_name)
        router.add("GET", "/api/customer/{customerId}/devices", self.customer_devices)
        router.add("POST", "/api/customer/{customerId}/device/{deviceId}", self.assign)
        router.add("DELETE", "/api/customer/device/{deviceId}", self.unassign)
        router.add("POST", "/api/customer", self.save_customer)
        router.add("GET", "/api/customer/{customerId}", self.get_customer)

    # --- devices --------------------------------------------------------------------------------------------------

    async def _device(self, request: ApiRequest, name: str = "deviceId") -> Device:
        device_id = uuid_param(name, request.params[name])
        device = await self.context.catalog.get_device(device_id)
        return check_device_access(request.user, device)

    async def save_device(self, request: ApiRequest) -> dict[str, Any]:
        user = request.user
        if user.authority is Authority.SYS_ADMIN:
            raise PermissionDenied(SYSADMIN_DENIED)
        body = json_object(request.json_body())
        name = _name(body, "name", "Device name should be specified!")
        device_type = _optional_str(body, "type") or "default"
        label = _optional_str(body, "label")
        additional_info = json_depth("additionalInfo", body.get("additionalInfo"))
        token = text("accessToken", request.query("accessToken"))
        if token is not None and not token.strip():
            raise BadRequest("Incorrect accessToken: it must not be empty")
        customer_raw = None if user.is_customer else _id_of(body.get("customerId"))
        customer_given = uuid_param("customerId", customer_raw) if customer_raw else None
        catalog = self.context.catalog
        existing_id = _id_of(body.get("id"))
        if existing_id:
            device = check_device_access(user, await catalog.get_device(uuid_param("id", existing_id)))
            updated = Device(device.id, device.created_time, device.tenant_id, device.customer_id, name,
                             device_type, label, additional_info, device.version)
            device = await catalog.update_device(updated)
            if token is not None:
                await catalog.update_credentials(device.id, token)
            return device_json(device)
        customer_id = user.customer_id if user.is_customer else NULL_UUID
        if customer_given is not None:
            customer_id = await self._customer_id_of_tenant(request, customer_given)
        device, _ = await catalog.create_device(user.tenant_id, name, device_type, label, additional_info,
                                                customer_id, token)
        return device_json(device)

    async def get_device(self, request: ApiRequest) -> dict[str, Any]:
        return device_json(await self._device(request))

    # --- device infos: the device, its customer's title and whether it is connected ---------------------------------

    async def _infos(self, devices: list[Device]) -> dict[UUID, dict[str, Any]]:
        """Device infos by device id (a page has few customers: one lookup each)."""
        presence, titles = self.context.presence, {NULL_UUID: None}
        for customer_id in {device.customer_id for device in devices} - titles.keys():
            customer = await self.context.repository.get_customer(customer_id)
            titles[customer_id] = customer.title if customer is not None else None
        return {device.id: device_info_json(device, presence is not None and presence.active(device.id),
                                            titles[device.customer_id]) for device in devices}

    async def get_device_info(self, request: ApiRequest) -> dict[str, Any]:
        device = await self._device(request)
        return (await self._infos([device]))[device.id]

    async def tenant_device_infos(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN)
        link = page_link(request, DEVICE_SORTS)
        device_type = text("type", request.query("type")) or None
        page = await self.context.repository.list_tenant_devices(request.user.tenant_id, link, device_type)
        infos = await self._infos(page.data)
        return page_json(page, lambda device: infos[device.id])

    async def customer_device_infos(self, request: ApiRequest) -> dict[str, Any]:
        customer = await self._customer(request)
        link = page_link(request, DEVICE_SORTS)
        page = await self.context.repository.list_customer_devices(customer.tenant_id, customer.id, link)
        infos = await self._infos(page.data)
        return page_json(page, lambda device: infos[device.id])

    async def delete_device(self, request: ApiRequest) -> Response:
        require_authority(request.user, Authority.TENANT_ADMIN)
        device = await self._device(request)
        await self.context.catalog.delete_device(device.id)
        if self.context.presence is not None:
            self.context.presence.forget(device.id)
        ref = self.context.directory.existing(device.id)
        if ref is not None:
            self.context.directory.tell(device, m.DeviceRemoved())
        return Response(body=NO_BODY)

    async def get_credentials(self, request: ApiRequest) -> dict[str, Any]:
        device = await self._device(request)
        credentials = await self.context.repository.get_credentials(device.id)
        if credentials is None:
            raise NotFound("Device credentials wasn't found!")
        return credentials_json(credentials)

    async def tenant_devices(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN)
        repository = self.context.repository
        name = text("deviceName", request.query("deviceName"))
        if name is not None:
            device = await repository.get_tenant_device_by_name(request.user.tenant_id, name)
            if device is None:
                raise NotFound(f"Device with name '{name}' wasn't found!")
            return device_json(device)
        link = page_link(request, DEVICE_SORTS)
        device_type = text("type", request.query("type")) or None
        page = await repository.list_tenant_devices(request.user.tenant_id, link, device_type)
        return page_json(page, device_json)

    async def tenant_device_by_name(self, request: ApiRequest) -> dict[str, Any]:
        """ThingsBoard's current ``GET /api/tenant/device?deviceName=`` (tb-rest-client's get_tenant_device)."""
        require_authority(request.user, Authority.TENANT_ADMIN)
        name = text("deviceName", request.query("deviceName"))
        if not name:
            raise InvalidArguments("Required request parameter 'deviceName' is not present")
        device = await self.context.repository.get_tenant_device_by_name(request.user.tenant_id, name)
        if device is None:
            raise NotFound(f"Device with name '{name}' wasn't found!")
        return device_json(device)

    async def customer_devices(self, request: ApiRequest) -> dict[str, Any]:
        customer = await self._customer(request)
        link = page_link(request, DEVICE_SORTS)
        page = await self.context.repository.list_customer_devices(customer.tenant_id, customer.id, link)
        return page_json(page, device_json)

    async def assign(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN)
        customer = await self._customer(request)
        device = await self._device(request)
        return device_json(await self.context.catalog.assign_device(device.id, customer.id))

    async def unassign(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN)
        device = await self._device(request)
        if device.customer_id == NULL_UUID:
            raise BadRequest("Device isn't assigned to any customer!")
        return device_json(await self.context.catalog.assign_device(device.id, NULL_UUID))

    # --- customers ------------------------------------------------------------------------------------------------

    async def _customer_id_of_tenant(self, request: ApiRequest, customer_id: UUID) -> Any:
        customer = await self.context.repository.get_customer(customer_id)
        if customer is None or customer.tenant_id != request.user.tenant_id:
            raise NotFound(CUSTOMER_NOT_FOUND)
        return customer.id

    async def _customer(self, request: ApiRequest) -> Any:
        user = request.user
        if user.authority is Authority.SYS_ADMIN:
            raise PermissionDenied(SYSADMIN_DENIED)
        customer = await self.context.repository.get_customer(uuid_param("customerId", request.params["customerId"]))
        if customer is None:
            raise NotFound(CUSTOMER_NOT_FOUND)
        if customer.tenant_id != user.tenant_id or (user.is_customer and customer.id != user.customer_id):
            raise PermissionDenied()
        return customer

    async def save_customer(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN)
        body = json_object(request.json_body())
        title = _name(body, "title", "Customer title should be specified!")
        repository = self.context.repository
        existing_id = _id_of(body.get("id"))
        if existing_id:
            request.params["customerId"] = str(uuid_param("id", existing_id))
            customer = await self._customer(request)
            return customer_json(await repository.update_customer(replace(customer, title=title)))
        return customer_json(await repository.create_customer(request.user.tenant_id, title))

    async def get_customer(self, request: ApiRequest) -> dict[str, Any]:
        return customer_json(await self._customer(request))
