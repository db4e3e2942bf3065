"""A read-through cache of devices in front of the repository.

Every MQTT CONNECT and every REST command looks a device up; a fleet reconnecting at thousands per second must not
turn into thousands of queries. NanoIoT is one process and every write goes through here, so invalidating on
write keeps the cache exact.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable
from uuid import UUID

from twisted.internet.defer import Deferred, fail, succeed

from nanoiot.errors import BadRequest
from nanoiot.persistence.records import Device, DeviceCredentials, NULL_UUID
from nanoiot.persistence.repository import Repository

#: The ``credentials_id`` column's length: no device has a longer token.
MAX_TOKEN_LENGTH = 255
#: The length of a device's name, type and label columns.
MAX_TEXT = 255


class DeviceCatalog:
    def __init__(self, repository: Repository, max_entries: int = 200_000, clock: Any = None,
                 lookup_batch: int = 500, lookups_in_flight: int = 1, lookup_gather: float = 0.002,
                 lookup_gather_below: int = 16) -> None:
        self.repository = repository
        self.max_entries = max_entries
        self.clock = clock
        self.lookup_batch = lookup_batch
        #: Token queries running at once, at most (a query of a full ``lookup_batch`` goes regardless): tokens asked
        #: for meanwhile wait for one to end and go together. A connect storm then costs one query (and one trip
        #: to a database thread, ~100 µs of CPU on both sides) per few dozen devices instead of per 3-4, and an idle
        #: server still looks a token up on the next reactor turn.
        self.lookups_in_flight = max(1, lookups_in_flight)
        #: When a query ends with fewer than ``lookup_gather_below`` tokens waiting, they wait ``lookup_gather``
        #: seconds more for others (a storm's queries then carry dozens of tokens; per query, the database thread
        #: spends ~100 µs and the reactor ~20 µs whatever it carries). A lookup on an idle server does not wait.
        self.lookup_gather = lookup_gather
        self.lookup_gather_below = lookup_gather_below
        #: token -> callers waiting for it, looked up together on the next reactor turn (or once a query ends).
        self._wanted: dict[str, list[Deferred]] = {}
        self._lookup_scheduled = False
        self._running = 0
        self._by_id: OrderedDict[UUID, Device] = OrderedDict()
        self._id_by_token: dict[str, UUID] = {}
        self._token_by_id: dict[UUID, str] = {}
        #: Told (device id, deleted) after a device, its credentials or its customer changed (the cluster tells the
        #: other nodes to drop their cached copies).
        self.changed: Callable[[UUID, bool], None] | None = None

    # --- reads ----------------------------------------------------------------------------------------------------

    def cached_device(self, device_id: UUID) -> Device | None:
        """The device if it is in memory, without a Deferred (the REST RPC path's fast case)."""
        return self._by_id.get(device_id)

    def get_device(self, device_id: UUID) -> Deferred:
        device = self._by_id.get(device_id)
        if device is not None:
            return succeed(device)
        return self.repository.get_device(device_id).addCallback(self._remember)

    def device_for_token(self, token: str) -> Deferred:
        """The device whose access token this is (None for none). Every door (MQTT CONNECT, CoAP, the HTTP device
        API) looks tokens up here, so a token no device can have (longer than the column, or with a NUL that
        PostgreSQL refuses) is answered here without a query."""
        if not _storable_token(token):
            return succeed(None)
        device_id = self._id_by_token.get(token)
        if device_id is not None:
            device = self._by_id.get(device_id)
            if device is not None:
                return succeed(device)

        if self.clock is None:
            return self.repository.get_device_by_token(token).addCallback(self._found, token)
        d: Deferred = Deferred()
        waiting = self._wanted.get(token)
        if waiting is None:
            self._wanted[token] = [d]
        else:
            waiting.append(d)
        if not self._lookup_scheduled and (self._running < self.lookups_in_flight
                                           or len(self._wanted) >= self.lookup_batch):
            self._lookup_scheduled = True
            self.clock.callLater(0, self._look_up_wanted)
        return d

    def _found(self, device: Device | None, token: str) -> Device | None:
        if device is not None:
            self._remember(device)
            self._link_token(device.id, token)
        return device

    def _look_up_wanted(self) -> None:
        """Every token asked for since the last query, in queries of ``lookup_batch``: a fleet reconnecting at
        thousands per second costs a few queries per turn, not one each."""
        self._lookup_scheduled = False
        if self._running >= self.lookups_in_flight and len(self._wanted) < self.lookup_batch:
            return  # the end of a running query sends them
        wanted, self._wanted = self._wanted, {}
        tokens = list(wanted)
        for start in range(0, len(tokens), self.lookup_batch):
            chunk = tokens[start:start + self.lookup_batch]
            d = self.repository.get_devices_by_tokens(chunk)
            self._running += 1
            d.addCallbacks(self._answer_lookups, self._fail_lookups, callbackArgs=(chunk, wanted),
                           errbackArgs=(chunk, wanted))

    def _answer_lookups(self, found: dict[str, Device], chunk: list[str], wanted: dict[str, list[Deferred]]) -> None:
        self._running -= 1
        for token in chunk:
            device = self._found(found.get(token), token)
            for d in wanted[token]:
                d.callback(device)
        self._next_lookup()

    def _fail_lookups(self, failure: Any, chunk: list[str], wanted: dict[str, list[Deferred]]) -> None:
        self._running -= 1
        for token in chunk:
            for d in wanted[token]:
                d.errback(failure)
        self._next_lookup()

    def _next_lookup(self) -> None:
        """A query ended: the tokens that waited for it go together, now or once a few more joined them."""
        if self._wanted and not self._lookup_scheduled and self._running < self.lookups_in_flight:
            if self.lookup_gather > 0 and len(self._wanted) < self.lookup_gather_below:
                self._lookup_scheduled = True
                self.clock.callLater(self.lookup_gather, self._look_up_wanted)
            else:
                self._look_up_wanted()

    # --- writes (always through here, so the cache stays exact) ---------------------------------------------------

    def create_device(self, tenant_id: UUID, name: str, type: str = "default", label: str | None = None,
                      additional_info: Any = None, customer_id: UUID = NULL_UUID,
                      access_token: str | None = None) -> Deferred:
        try:  # every creator (REST, a gateway's new child device) gets the same limits, on both databases
            _check_text("name", name, required=True)
            _check_text("type", type, required=True)
            _check_text("label", label)
            if access_token is not None:
                _check_text("accessToken", access_token, required=True)
        except BadRequest as error:
            return fail(error)
        d = self.repository.create_device(tenant_id, name, type, label, additional_info, customer_id, access_token)

        def created(result: tuple[Device, DeviceCredentials]) -> tuple[Device, DeviceCredentials]:
            device, credentials = result
            self._remember(device)
            self._link_token(device.id, credentials.credentials_id)
            return result

        return d.addCallback(created)

    def update_device(self, device: Device) -> Deferred:
        self.forget(device.id)
        d = self.repository.update_device(device).addCallback(self._remember)
        return d.addCallback(self._tell_changed, device.id, False)

    def assign_device(self, device_id: UUID, customer_id: UUID) -> Deferred:
        self.forget(device_id)
        d = self.repository.assign_device(device_id, customer_id).addCallback(self._remember)
        return d.addCallback(self._tell_changed, device_id, False)

    def update_credentials(self, device_id: UUID, token: str) -> Deferred:
        if not _storable_token(token):
            return fail(BadRequest(f"accessToken: must be 1 to {MAX_TOKEN_LENGTH} characters, without NUL"))
        self.forget(device_id)
        return self.repository.update_credentials(device_id, token).addCallback(self._tell_changed, device_id, False)

    def delete_device(self, device_id: UUID) -> Deferred:
        self.forget(device_id)
        return self.repository.delete_device(device_id).addCallback(self._tell_changed, device_id, True)

    def _tell_changed(self, result: Any, device_id: UUID, deleted: bool) -> Any:
        if self.changed is not None:
            self.changed(device_id, deleted)
        return result

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


def _storable_token(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH and "\x00" not in token


def _check_text(field: str, value: str | None, required: bool = False) -> None:
    if value is None:
        if required:
            raise BadRequest(f"{field}: is required")
        return
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value or (required and not value.strip()):
        raise BadRequest(f"{field}: must be a non-empty string of at most {MAX_TEXT} characters, without NUL")
