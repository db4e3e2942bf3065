"""Every MQTT connection's next deadline (connect timeout, keep-alive check), kept by one timer for all of them.

A ``callLater`` per connection for its connect timeout, cancelled at CONNACK for another one for its keep-alive,
was ~9 % of the reactor's time in a connect storm (a ``DelayedCall`` each, pushed on and marked off Twisted's heap).
Here deadlines fall into slots of ``resolution`` seconds (the deadline rounded up: never early, at most one
resolution late) on a :class:`~nanoiot.timer_wheel.TimerWheel`: setting or moving a deadline costs a dict insert
and a dict delete.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from nanoiot.timer_wheel import TimerWheel

__all__ = ["DeadlineOwner", "Deadlines"]


class DeadlineOwner(Protocol):
    #: The slot its deadline is in (None: none set); kept by :class:`Deadlines`.
    deadline_slot: int | None

    def deadline_passed(self) -> None:
        """Its deadline passed (it may set a new one)."""


class Deadlines(TimerWheel[Any]):
    def __init__(self, clock: IReactorTime, resolution: float = 1.0) -> None:
        super().__init__(clock, resolution)

    def set(self, owner: DeadlineOwner, at: float) -> None:
        """``owner.deadline_passed()`` once the clock reaches ``at`` (replacing the deadline it had)."""
        slot = self.slot_at(at)
        old = owner.deadline_slot
        if old == slot:
            return
        if old is not None:
            self.remove(owner, old)
        self.add(owner, slot)
        owner.deadline_slot = slot

    def cancel(self, owner: DeadlineOwner) -> None:
        """No deadline for ``owner`` any more."""
        slot = owner.deadline_slot
        if slot is not None:
            self.remove(owner, slot)
            owner.deadline_slot = None

    def _due(self, owners: dict[Any, None]) -> None:
        for owner in owners:
            owner.deadline_slot = None
        self._tell(owners, "deadline_passed")
