"""Records rendered as ThingsBoard's JSON (entity ids as ``{"entityType","id"}``, nulls included)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, TypeVar
from uuid import UUID

from nanoiot.persistence.records import Customer, Device, DeviceCredentials, Page, RpcRecord, Tenant, User

T = TypeVar("T")

#: NanoIoT has no device profiles; every device reports one stable default profile id per tenant.
_PROFILE_NAMESPACE = UUID("6f1c3f5e-8d1b-4a52-9c1e-2b8f3e6a9d40")


def entity_id(entity_type: str, value: UUID) -> dict[str, str]:
    return {"entityType": entity_type, "id": str(value)}


def default_profile_id(tenant_id: UUID) -> UUID:
    return uuid.uuid5(_PROFILE_NAMESPACE, str(tenant_id))


def device_json(device: Device) -> dict[str, Any]:
    return {
        "id": entity_id("DEVICE", device.id),
        "createdTime": device.created_time,
        "tenantId": entity_id("TENANT", device.tenant_id),
        "customerId": entity_id("CUSTOMER", device.customer_id),
        "name": device.name,
        "type": device.type,
        "label": device.label,
        "deviceProfileId": entity_id("DEVICE_PROFILE", default_profile_id(device.tenant_id)),
        "deviceData": {"configuration": {"type": "DEFAULT"}, "transportConfiguration": {"type": "DEFAULT"}},
        "firmwareId": None,
        "softwareId": None,
        "externalId": None,
        "version": device.version,
        "additionalInfo": device.additional_info,
    }


def device_info_json(device: Device, active: bool, customer_title: str | None = None) -> dict[str, Any]:
    """ThingsBoard's DeviceInfo: the device with its customer's title, its profile's name and whether it is
    connected (``active``)."""
    info = device_json(device)
    info.update(customerTitle=customer_title, customerIsPublic=False, deviceProfileName="default", active=active)
    return info


def credentials_json(credentials: DeviceCredentials) -> dict[str, Any]:
    return {
        "id": {"id": str(credentials.id)},
        "createdTime": credentials.created_time,
        "deviceId": entity_id("DEVICE", credentials.device_id),
        "credentialsType": credentials.credentials_type,
        "credentialsId": credentials.credentials_id,
        "credentialsValue": credentials.credentials_value,
        "version": credentials.version,
    }


def customer_json(customer: Customer) -> dict[str, Any]:
    return {
        "id": entity_id("CUSTOMER", customer.id),
        "createdTime": customer.created_time,
        "tenantId": entity_id("TENANT", customer.tenant_id),
        "title": customer.title,
        "name": customer.title,
        "country": None, "state": None, "city": None, "address": None, "address2": None, "zip": None,
        "phone": None, "email": None,
        "additionalInfo": None,
        "externalId": None,
        "version": 1,
    }


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": entity_id("USER", user.id),
        "createdTime": user.created_time,
        "tenantId": entity_id("TENANT", user.tenant_id),
        "customerId": entity_id("CUSTOMER", user.customer_id),
        "email": user.email,
        "name": user.email,
        "authority": user.authority.value,
        "firstName": user.first_name,
        "lastName": user.last_name,
        "phone": None,
        # ThingsBoard reports whether the user may log in here (POST /api/user/{id}/userCredentialsEnabled).
        "additionalInfo": {"userCredentialsEnabled": user.enabled},
        "version": 1,
    }


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    """ThingsBoard's ``Tenant``; only the title is stored (the address fields are null, the region "Global")."""
    return {
        "id": entity_id("TENANT", tenant.id),
        "createdTime": tenant.created_time,
        "title": tenant.title,
        "name": tenant.title,
        "region": "Global",
        "tenantProfileId": entity_id("TENANT_PROFILE", uuid.uuid5(_PROFILE_NAMESPACE, "default tenant profile")),
        "country": None, "state": None, "city": None, "address": None, "address2": None, "zip": None,
        "phone": None, "email": None,
        "additionalInfo": None,
        "version": 1,
    }


def page_json(page: Page[T], render: Callable[[T], dict[str, Any]]) -> dict[str, Any]:
    return {
        "data": [render(item) for item in page.data],
        "totalPages": page.total_pages,
        "totalElements": page.total_elements,
        "hasNext": page.has_next,
    }


def rpc_json(record: RpcRecord) -> dict[str, Any]:
    """ThingsBoard's ``Rpc``: ``request.body.params`` is the params' JSON text; we add the device-visible
    ``requestId`` and who sent it (``createdBy``)."""
    tenant = entity_id("TENANT", record.tenant_id)
    device = entity_id("DEVICE", record.device_id)
    return {
        "id": entity_id("RPC", record.id),
        "createdTime": record.created_time,
        "tenantId": tenant,
        "deviceId": device,
        "expirationTime": record.expiration_time,
        "request": {
            "id": str(record.id),
            "tenantId": tenant,
            "deviceId": device,
            "oneway": record.oneway,
            "expirationTime": record.expiration_time,
            "body": {"method": record.method, "params": json.dumps(record.params, separators=(",", ":"))},
            "persisted": True,
            "retries": record.retries,
            "requestId": record.seq,
        },
        "response": record.response,
        "status": record.status.value,
        "additionalInfo": record.additional_info,
        "createdBy": entity_id("USER", record.user_id) if record.user_id else None,
        "initiator": record.initiator,
    }
