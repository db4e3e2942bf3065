"""The device actors' timer wake-ups, kept by one reactor call for all of them.

Each actor keeps its own timers (a command's expiry, ack wait, response wait) and needs to be woken at the
earliest. A ``callLater`` per actor for that, cancelled when its last command was answered and made again for the
next command, was a ``DelayedCall`` pushed on and marked off Twisted's heap per two-way command (~7 % of the command
path). Here a wake-up is a dict entry in the slot of its epoch millisecond, and one reactor call is armed for the
earliest slot, only while any wake-up is set: under load, adding or removing one costs a dict insert and a delete
(and a heap push for a new millisecond); the reactor call is cancelled once no wake-up is left, so idle actors
leave the reactor nothing. Like ``nanoiot/transports/mqtt/deadlines.py`` for MQTT connections, in whole
milliseconds (the actors' time unit) so that a wake-up is never late by rounding.
"""

from __future__ import annotations

import heapq
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="nanoiot.actors")

__all__ = ["Wakeups", "WakeupOwner"]


class WakeupOwner(Protocol):
    def wake_up(self) -> None:
        """Its wake-up time came (called from the reactor call, outside the owner's turn)."""


class Wakeups:
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: epoch ms -> owners to wake then (in the order they were added).
        self._slots: dict[int, dict[WakeupOwner, None]] = {}
        #: Slots that have owners, as a heap (a slot emptied meanwhile stays until it comes up).
        self._heap: list[int] = []
        self._call: IDelayedCall | None = None
        self._call_at: int | None = None
        #: True while due owners are woken (what they add is armed for once they all were).
        self._firing = False

    def __len__(self) -> int:
        return sum(len(owners) for owners in self._slots.values())

    def add(self, owner: WakeupOwner, at: int) -> None:
        """``owner.wake_up()`` once the clock reaches ``at`` (epoch ms). An owner keeps track of what it added."""
        owners = self._slots.get(at)
        if owners is None:
            owners = self._slots[at] = {}
            heapq.heappush(self._heap, at)
            if not self._firing and (self._call_at is None or at < self._call_at):
                self._arm()
        owners[owner] = None

    def remove(self, owner: WakeupOwner, at: int) -> None:
        """Forget ``owner``'s wake-up at ``at`` (nothing if it has already been woken for it)."""
        slots = self._slots
        owners = slots.get(at)
        if owners is not None and owner in owners:
            del owners[owner]
            if not owners:
                del slots[at]
                if not slots and self._call is not None:
                    self._call.cancel()  # nothing left to wake: leave the reactor no call of ours
                    self._call = self._call_at = None

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _arm(self) -> None:
        """Arm the one reactor call for the earliest slot that has owners (none if there is none)."""
        heap, slots = self._heap, self._slots
        while heap and heap[0] not in slots:
            heapq.heappop(heap)
        if self._call is not None:
            self._call.cancel()
            self._call = self._call_at = None
        if heap:
            at = heap[0]
            self._call = self.clock.callLater(max(0.0, (at - self._now()) / 1000.0), self._fire)
            self._call_at = at

    def _fire(self) -> None:
        self._call = self._call_at = None
        now = self._now()
        heap, slots = self._heap, self._slots
        self._firing = True
        try:
            while heap and heap[0] <= now:
                owners = slots.pop(heapq.heappop(heap), None)
                if not owners:
                    continue  # emptied meanwhile, or a second heap entry of a slot already woken
                for owner in owners:
                    try:
                        owner.wake_up()
                    except Exception:  # one actor's bug must not cost the others their timers
                        log.failure("a wake-up of {owner} failed", owner=owner)
        finally:
            self._firing = False
            if slots and self._call is None:
                self._arm()

    def __repr__(self) -> str:
        return f"<Wakeups slots={len(self._slots)} next={self._call_at}>"


def wakeups_of(context: Any) -> Wakeups:
    """The context's wheel, made on first use (the context is built before its clock is known to run)."""
    wheel = context.wakeups
    if wheel is None:
        wheel = context.wakeups = Wakeups(context.clock)
    return wheel
