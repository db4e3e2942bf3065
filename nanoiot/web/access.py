"""Who may touch which device: one place for the tenant and customer ownership rules."""

from __future__ import annotations

from nanoiot.errors import NotFound, PermissionDenied
from nanoiot.persistence.records import Authority, Device
from nanoiot.web.tokens import Principal

SYSADMIN_DENIED = "System administrator is not allowed to perform this operation!"
DEVICE_NOT_FOUND = "Device with requested id wasn't found!"


def require_authority(principal: Principal, *allowed: Authority) -> None:
    if principal.authority not in allowed:
        raise PermissionDenied()


def check_device_access(principal: Principal, device: Device | None) -> Device:
    """ThingsBoard's rules: a tenant admin reaches its tenant's devices, a customer user its customer's."""
    if device is None:
        raise NotFound(DEVICE_NOT_FOUND)
    if principal.authority is Authority.SYS_ADMIN:
        raise PermissionDenied(SYSADMIN_DENIED)
    if device.tenant_id != principal.tenant_id:
        raise PermissionDenied()
    if principal.authority is Authority.CUSTOMER_USER and device.customer_id != principal.customer_id:
        raise PermissionDenied()
    return device
