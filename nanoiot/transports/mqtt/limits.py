"""What the MQTT listener allows one device, one tenant and one address: built from the config, kept by the factory.

- Inbound window (``--mqtt-max-inflight-in``, ``--mqtt-max-queued-bytes``): see :mod:`nanoiot.transports.mqtt.flow`.
- Message rates per device and per tenant (``--device-rate-limit``, ``--tenant-device-rate-limit``, ThingsBoard's
  ``"capacity:seconds,..."``): every PUBLISH takes a token from both. Without one, ``--rate-limit-action`` decides:
  ``throttle`` stops reading the device's socket until the tokens are back (the device's TCP window fills and it
  slows down, nothing is lost), ``close`` closes the connection (MQTT 5: DISCONNECT 0x96 Message rate too high).
- Connections per source address (``--max-connections-per-address``; refused before CONNECT by closing) and MQTT
  connections per device (``--max-sessions-per-device``; CONNACK 3 Server unavailable / MQTT 5 0x97 Quota
  exceeded). A reconnect replaces the device's older connection, which then closes: the limit must leave room for
  that overlap, so it is not 1.
- A device that does not read (``--mqtt-write-timeout``): while the socket's write buffer is full the connection
  reads nothing more (it would only add PUBACKs to that buffer) and after this many seconds it is closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
from uuid import UUID

from nanoiot.limits import Counter, KeyedLimiter, Rate

THROTTLE, CLOSE = "throttle", "close"
ACTIONS = (THROTTLE, CLOSE)


@dataclass
class MqttLimits:
    max_inflight_in: int = 100
    max_queued_bytes: int = 1024 * 1024
    device_rates: tuple[Rate, ...] = ()
    tenant_rates: tuple[Rate, ...] = ()
    rate_action: str = THROTTLE
    max_connections_per_address: int = 0
    max_sessions_per_device: int = 0
    #: Seconds a connection whose write buffer stays full is kept (0: for ever, reading stays paused).
    write_timeout: float = 0.0
    clock: Callable[[], float] | None = None
    device_limiter: KeyedLimiter[UUID] = field(init=False)
    tenant_limiter: KeyedLimiter[UUID] = field(init=False)
    addresses: Counter[str] = field(init=False)
    device_sessions: Counter[UUID] = field(init=False)

    def __post_init__(self) -> None:
        if self.rate_action not in ACTIONS:
            raise ValueError(f"rate limit action must be one of {', '.join(ACTIONS)}, not {self.rate_action!r}")
        clock = self.clock or _no_clock
        self.device_limiter = KeyedLimiter(self.device_rates, clock)
        self.tenant_limiter = KeyedLimiter(self.tenant_rates, clock)
        self.addresses = Counter(self.max_connections_per_address)
        self.device_sessions = Counter(self.max_sessions_per_device)

    @property
    def rated(self) -> bool:
        """Whether any message rate is set (else a PUBLISH costs no look-up at all)."""
        return bool(self.device_rates or self.tenant_rates)

    def take(self, device_id: UUID, tenant_id: UUID) -> float:
        """0.0 if one more message of this device is allowed now (and counted), else seconds until it would be.

        The tenant's bucket is asked only once the device's allowed the message, so a throttled tenant does not
        also use up its devices' own allowance."""
        wait = self.device_limiter.take(device_id)
        if wait:
            return wait
        return self.tenant_limiter.take(tenant_id)


def _no_clock() -> float:
    raise RuntimeError("MqttLimits needs a clock to apply rate limits")
