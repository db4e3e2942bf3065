"""Many owners' timers on ONE reactor call: the base of the device actors' wake-ups and the MQTT deadlines.

A ``callLater`` per owner, cancelled and made again whenever its time moves, was a ``DelayedCall`` pushed on and
marked off Twisted's heap per command (device actors) or per connection (MQTT): several percent of the reactor.
Here a timer is a dict entry in the slot of its integer time (``resolution`` seconds per slot), the slots that have
owners sit on a heap, and one reactor call is armed for the earliest of them, only while any is set: adding or
removing a timer costs a dict insert or delete (and a heap push for a new slot). The call is cancelled once no
timer is left, so idle owners leave the reactor nothing.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Generic, Hashable, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="nanoiot.timers")

__all__ = ["TimerWheel"]

Owner = TypeVar("Owner", bound=Hashable)
#: How early (in slots) a slot counts as due: float noise, never a real wait (1 µs for the actors' millisecond slots).
SLOT_SLACK = 1e-3


class TimerWheel(Generic[Owner]):
    """Subclasses say how an owner is told (:meth:`_due`) and may keep their own notion of slots."""

    def __init__(self, clock: IReactorTime, resolution: float) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be > 0, not {resolution!r}")
        self.clock = clock
        self.resolution = resolution
        #: slot -> owners whose timer is in it (in the order they were added).
        self._slots: dict[int, dict[Owner, None]] = {}
        #: Slots that have owners, as a heap (a slot emptied meanwhile stays until it comes up).
        self._heap: list[int] = []
        self._call: IDelayedCall | None = None
        self._call_slot: int | None = None
        #: True while due owners are told (what they add is armed for once they all were).
        self._firing = False

    def __len__(self) -> int:
        return sum(len(owners) for owners in self._slots.values())

    def slot_at(self, seconds: float) -> int:
        """The slot of the clock time ``seconds``, rounded up: a timer in it is never told early."""
        return math.ceil(seconds / self.resolution)

    def add(self, owner: Owner, slot: int) -> None:
        """Tell ``owner`` once the clock reaches ``slot`` × ``resolution`` seconds."""
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
            if not self._firing and (self._call_slot is None or slot < self._call_slot):
                self._arm()
        owners[owner] = None

    def remove(self, owner: Owner, slot: int) -> None:
        """Forget ``owner``'s timer in ``slot`` (nothing if it has already been told)."""
        slots = self._slots
        owners = slots.get(slot)
        if owners is not None and owner in owners:
            del owners[owner]
            if not owners:
                del slots[slot]
                if not slots and self._call is not None:
                    self._call.cancel()  # nothing left to wait for: leave the reactor no call of ours
                    self._call = self._call_slot = None

    def _now_slot(self) -> float:
        # A thousandth of a slot past the division: ``1.001 / 0.001`` is 1000.999..., and epoch seconds carry ~2e-7 s
        # of float error, so the call armed for a slot must find it due (else it would re-arm itself for ~0 s).
        return self.clock.seconds() / self.resolution + SLOT_SLACK

    def _arm(self) -> None:
        """Arm the one reactor call for the earliest slot that has owners (none if there is none)."""
        heap, slots = self._heap, self._slots
        while heap and heap[0] not in slots:
            heapq.heappop(heap)
        if self._call is not None:
            self._call.cancel()
            self._call = self._call_slot = None
        if heap:
            slot = heap[0]
            delay = max(0.0, (slot - self.clock.seconds() / self.resolution) * self.resolution)
            self._call = self.clock.callLater(delay, self._fire)
            self._call_slot = slot

    def _fire(self) -> None:
        self._call = self._call_slot = None
        now = self._now_slot()
        heap, slots = self._heap, self._slots
        self._firing = True
        try:
            while heap and heap[0] <= now:
                owners = slots.pop(heapq.heappop(heap), None)
                if not owners:
                    continue  # emptied meanwhile, or a second heap entry of a slot already told
                self._due(owners)
        finally:
            self._firing = False
            if slots and self._call is None:
                self._arm()

    def _due(self, owners: dict[Owner, None]) -> None:
        raise NotImplementedError

    def _tell(self, owners: Any, method: str) -> None:
        """``owner.<method>()`` for each; one owner's bug must not cost the others their timers."""
        for owner in owners:
            try:
                getattr(owner, method)()
            except Exception:
                log.failure("a timer of {owner} failed", owner=owner)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} slots={len(self._slots)} next={self._call_slot}>"
