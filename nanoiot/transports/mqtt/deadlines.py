"""Every MQTT connection's next deadline (connect timeout, keep-alive check), kept by one timer for all of them.

A ``callLater`` per connection for its connect timeout, cancelled at CONNACK for another one for its keep-alive,
was ~9 % of the reactor's time in a connect storm (a ``DelayedCall`` each, pushed on and marked off Twisted's heap).
Here deadlines fall into slots of ``resolution`` seconds (the deadline rounded up: never early, at most one
resolution late), a slot is a dict of its connections, and one reactor call is armed, for the earliest slot, only
while any deadline is set: setting or moving a deadline costs a dict insert and a dict delete.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="nanoiot.mqtt")

__all__ = ["DeadlineOwner", "Deadlines"]


class DeadlineOwner(Protocol):
    #: The slot its deadline is in (None: none set); kept by :class:`Deadlines`.
    deadline_slot: int | None

    def deadline_passed(self) -> None:
        """Its deadline passed (it may set a new one)."""


class Deadlines:
    def __init__(self, clock: IReactorTime, resolution: float = 1.0) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be > 0, not {resolution!r}")
        self.clock = clock
        self.resolution = resolution
        #: slot -> owners whose deadline is in it (in the order they were set).
        self._slots: dict[int, dict[DeadlineOwner, None]] = {}
        #: Slots that have owners, as a heap (a slot emptied meanwhile stays until it comes up).
        self._heap: list[int] = []
        self._call: IDelayedCall | None = None
        self._call_slot: int | None = None
        #: True while due owners are told (a deadline they set is armed for once they all were).
        self._firing = False

    def __len__(self) -> int:
        return sum(len(owners) for owners in self._slots.values())

    def set(self, owner: DeadlineOwner, at: float) -> None:
        """``owner.deadline_passed()`` once the clock reaches ``at`` (replacing the deadline it had)."""
        slot = math.ceil(at / self.resolution)
        old = owner.deadline_slot
        if old == slot:
            return
        if old is not None:
            self._remove(owner, old)
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
            if not self._firing and (self._call_slot is None or slot < self._call_slot):
                self._arm()
        owners[owner] = None
        owner.deadline_slot = slot

    def cancel(self, owner: DeadlineOwner) -> None:
        """No deadline for ``owner`` any more."""
        slot = owner.deadline_slot
        if slot is not None:
            self._remove(owner, slot)
            owner.deadline_slot = None
            if not self._slots and self._call is not None:
                self._call.cancel()  # nothing left to wait for: leave the reactor no call of ours
                self._call = self._call_slot = None

    def _remove(self, owner: DeadlineOwner, slot: int) -> None:
        owners = self._slots[slot]
        del owners[owner]
        if not owners:
            del self._slots[slot]

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
            delay = max(0.0, slot * self.resolution - self.clock.seconds())
            self._call = self.clock.callLater(delay, self._fire)
            self._call_slot = slot

    def _fire(self) -> None:
        self._call = self._call_slot = None
        now = self.clock.seconds()
        heap, slots = self._heap, self._slots
        self._firing = True
        try:
            while heap and heap[0] * self.resolution <= now:
                owners = slots.pop(heapq.heappop(heap), None)
                if not owners:
                    continue
                for owner in owners:
                    owner.deadline_slot = None
                for owner in owners:
                    try:
                        owner.deadline_passed()
                    except Exception:  # one connection's bug must not cost the others their deadlines
                        log.failure("mqtt: a deadline of {owner} failed", owner=owner)
        finally:
            self._firing = False
            if slots and self._call is None:
                self._arm()
