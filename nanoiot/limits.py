"""Rate limits and counted limits shared by every door (REST, login, MQTT, HTTP and CoAP devices).

Pure code on an injected clock: a token bucket per key, with the number of keys itself bounded so that a flood of
distinct keys (addresses, forged device ids) cannot grow memory without end.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Rate:
    """``capacity`` events at once, refilled at ``capacity`` per ``period`` seconds (ThingsBoard writes such a
    limit as ``"capacity:period"``, e.g. ``"100:1,3000:60"``)."""

    capacity: int
    period: float

    @property
    def per_second(self) -> float:
        return self.capacity / self.period


def parse_rates(text: str) -> tuple[Rate, ...]:
    """``"100:1,3000:60"`` → two rates that must both allow an event; ``""`` → no limit."""
    rates: list[Rate] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        capacity, sep, period = part.partition(":")
        if not sep:
            raise ValueError(f"{part!r}: expected capacity:seconds, like 100:1")
        rate = Rate(int(capacity), float(period))
        if rate.capacity < 1 or not math.isfinite(rate.period) or rate.period <= 0:
            raise ValueError(f"{part!r}: capacity and seconds must be positive")
        rates.append(rate)
    return tuple(rates)


class TokenBucket:
    """One bucket per rate; an event is allowed only if every rate has a token left."""

    __slots__ = ("rates", "tokens", "stamp")

    def __init__(self, rates: tuple[Rate, ...], now: float) -> None:
        self.rates = rates
        self.tokens = [float(rate.capacity) for rate in rates]
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            for i, rate in enumerate(self.rates):
                self.tokens[i] = min(float(rate.capacity), self.tokens[i] + elapsed * rate.per_second)
            self.stamp = now

    def take(self, now: float, count: int = 1) -> float:
        """0.0 if ``count`` events are allowed now (and counted), else the seconds until they would be."""
        self._refill(now)
        wait = 0.0
        for i, rate in enumerate(self.rates):
            missing = count - self.tokens[i]
            if missing > 0:
                wait = max(wait, missing / rate.per_second)
        if wait > 0:
            return wait
        for i in range(len(self.tokens)):
            self.tokens[i] -= count
        return 0.0

    def full(self, now: float) -> bool:
        self._refill(now)
        return all(t >= rate.capacity for t, rate in zip(self.tokens, self.rates))


class KeyedLimiter(Generic[K]):
    """A token bucket per key, at most ``max_keys`` of them: the least recently used bucket is dropped first
    (a dropped bucket was idle longest, so forgetting it errs towards allowing, never towards refusing others)."""

    def __init__(self, rates: tuple[Rate, ...], clock: Callable[[], float], max_keys: int = 100_000) -> None:
        self.rates = rates
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.rates)

    def take(self, key: K, count: int = 1) -> float:
        """0.0 if allowed (and counted), else seconds to wait; always 0.0 when no rate is configured."""
        if not self.rates:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rates, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, count)

    def forget(self, key: K) -> None:
        self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)


class Counter(Generic[K]):
    """Counts open things per key (connections per address, sessions per device) against a maximum."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._counts: dict[K, int] = {}

    def acquire(self, key: K) -> bool:
        """True and counted if under the maximum (0: no maximum), else False and nothing counted."""
        count = self._counts.get(key, 0)
        if self.maximum and count >= self.maximum:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: K) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def count(self, key: K) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)
