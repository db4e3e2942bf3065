"""REST rate limits as ThingsBoard's tenant profile sets them: ``tenantServerRestLimitsConfiguration`` (every REST
request of a tenant's users), ``customerServerRestLimitsConfiguration`` (of a customer's users, on top of their
tenant's) and, NanoIoT's own, commands per target device (so that one device cannot be flooded even within a
tenant's budget). The system administrator is not limited (as in ThingsBoard). Over a limit: 429 with ThingsBoard's
body, ``"Too many requests for current tenant!"`` (``customer``, ``device``), errorCode 33, and ``Retry-After``.

Checked by the JSON router after authentication; with no limit configured the router holds no
:class:`RestRateLimits` at all, so the hot path does nothing.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from nanoiot.errors import TooManyRequests
from nanoiot.limits import KeyedLimiter, parse_rates
from nanoiot.persistence.records import Authority
from nanoiot.web.tokens import Principal


def too_many(entity: str, wait: float) -> TooManyRequests:
    """ThingsBoard's ``handleRateLimitException`` message, with the seconds to wait."""
    return TooManyRequests(f"Too many requests for current {entity}!", retry_after=wait)


class RestRateLimits:
    """A token bucket per tenant, per customer and per commanded device (``nanoiot/limits.py``)."""

    def __init__(self, tenant: str, customer: str, device_rpc: str, clock: Callable[[], float],
                 max_keys: int = 100_000) -> None:
        self.tenant = KeyedLimiter[UUID](parse_rates(tenant), clock, max_keys)
        self.customer = KeyedLimiter[UUID](parse_rates(customer), clock, max_keys)
        self.device_rpc = KeyedLimiter[UUID](parse_rates(device_rpc), clock, max_keys)

    @classmethod
    def from_config(cls, config: Any, clock: Any) -> RestRateLimits | None:
        """None when no limit is configured (the router then checks nothing)."""
        limits = cls(config.tenant_rest_rate_limit, config.customer_rest_rate_limit, config.device_rpc_rate_limit,
                     clock.seconds)
        return limits if limits.enabled else None

    @property
    def enabled(self) -> bool:
        return self.tenant.enabled or self.customer.enabled or self.device_rpc.enabled

    def check(self, principal: Principal, method: bytes, params: dict[str, str]) -> None:
        """Counts one REST request of ``principal``; raises :class:`TooManyRequests` when a limit refuses it. A
        POST naming a ``deviceId`` (``/api/rpc/{kind}/{deviceId}``, ``/api/plugins/rpc/...``) is a command."""
        if principal.authority is Authority.SYS_ADMIN:
            return
        self._check_caller(principal)
        if method == b"POST" and self.device_rpc.enabled:
            raw = params.get("deviceId")
            if raw is not None:
                self.check_device_rpc(raw)

    def check_command(self, principal: Principal, device_id: UUID) -> None:
        """A command sent another way (a WebSocket ``rpc`` frame): the same limits as a REST command."""
        if principal.authority is Authority.SYS_ADMIN:
            return
        self._check_caller(principal)
        self.check_device_rpc(device_id)

    def _check_caller(self, principal: Principal) -> None:
        wait = self.tenant.take(principal.tenant_id)
        if wait:
            raise too_many("tenant", wait)
        if principal.authority is Authority.CUSTOMER_USER:
            wait = self.customer.take(principal.customer_id)
            if wait:
                raise too_many("customer", wait)

    def check_device_rpc(self, device_id: str | UUID) -> None:
        """Counts one command to ``device_id`` (a text that is no device id is left to the handler's 400)."""
        if not self.device_rpc.enabled:
            return
        if not isinstance(device_id, UUID):
            try:
                device_id = UUID(device_id)
            except (ValueError, TypeError, AttributeError):
                return
        wait = self.device_rpc.take(device_id)
        if wait:
            raise too_many("device", wait)
