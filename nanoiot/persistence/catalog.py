"""A read-through cache of devices in front of the repository.

Every MQTT CONNECT and every REST command looks a device up; a fleet reconnecting at thousands per second must not
turn into thousands of queries. NanoIoT is one process and every write goes through here, so invalidating on
write keeps the cache exact.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, succeed

from nanoiot.persistence.records import Device, DeviceCredentials, NULL_UUID
from nanoiot.persistence.repository import Repository


class DeviceCatalog:
    def __init__(self, repository: Repository, max_entries: int = 200_000) -> None:
        self.repository = repository
        self.max_entries = max_entries
        self._by_id: OrderedDict[UUID, Device] = OrderedDict()
        self._id_by_token: dict[str, UUID] = {}
        self._token_by_id: dict[UUID, str] = {}

    # --- reads ----------------------------------------------------------------------------------------------------

    def get_device(self, device_id: UUID) -> Deferred:
        device = self._by_id.get(device_id)
        if device is not None:
            return succeed(device)
        return self.repository.get_device(device_id).addCallback(self._remember)

    def device_for_token(self, token: str) -> Deferred:
        device_id = self._id_by_token.get(token)
        if device_id is not None:
            device = self._by_id.get(device_id)
            if device is not None:
                return succeed(device)

        def found(device: Device | None) -> Device | None:
            if device is not None:
                self._remember(device)
                self._link_token(device.id, token)
            return device

        return self.repository.get_device_by_token(token).addCallback(found)

    # --- writes (always through here, so the cache stays exact) ---------------------------------------------------

    def create_device(self, tenant_id: UUID, name: str, type: str = "default", label: str | None = None,
                      additional_info: Any = None, customer_id: UUID = NULL_UUID,
                      access_token: str | None = None) -> Deferred:
        d = self.repository.create_device(tenant_id, name, type, label, additional_info, customer_id, access_token)

        def created(result: tuple[Device, DeviceCredentials]) -> tuple[Device, DeviceCredentials]:
            device, credentials = result
            self._remember(device)
            self._link_token(device.id, credentials.credentials_id)
            return result

        return d.addCallback(created)

    def update_device(self, device: Device) -> Deferred:
        self.forget(device.id)
        return self.repository.update_device(device).addCallback(self._remember)

    def assign_device(self, device_id: UUID, customer_id: UUID) -> Deferred:
        self.forget(device_id)
        return self.repository.assign_device(device_id, customer_id).addCallback(self._remember)

    def update_credentials(self, device_id: UUID, token: str) -> Deferred:
        self.forget(device_id)
        return self.repository.update_credentials(device_id, token)

    def delete_device(self, device_id: UUID) -> Deferred:
        self.forget(device_id)
        return self.repository.delete_device(device_id)

    def forget(self, device_id: UUID) -> None:
        self._by_id.pop(device_id, None)
        token = self._token_by_id.pop(device_id, None)
        if token is not None:
            self._id_by_token.pop(token, None)

    # --- internals ------------------------------------------------------------------------------------------------

    def _remember(self, device: Device | None) -> Device | None:
        if device is None:
            return None
        self._by_id[device.id] = device
        self._by_id.move_to_end(device.id)
        while len(self._by_id) > self.max_entries:
            old_id, _ = self._by_id.popitem(last=False)
            token = self._token_by_id.pop(old_id, None)
            if token is not None:
                self._id_by_token.pop(token, None)
        return device

    def _link_token(self, device_id: UUID, token: str) -> None:
        self._id_by_token[token] = device_id
        self._token_by_id[device_id] = token
