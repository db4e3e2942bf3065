"""The device actors' timer wake-ups, kept by one reactor call for all of them (:mod:`nanoiot.timer_wheel`).

Each actor keeps its own timers (a command's expiry, ack wait, response wait) and needs to be woken at the
earliest. A ``callLater`` per actor for that, cancelled when its last command was answered and made again for the
next command, was a ``DelayedCall`` pushed on and marked off Twisted's heap per two-way command (~7 % of the command
path). Here a wake-up is an entry in the slot of its epoch millisecond (the actors' time unit, so that a wake-up is
never late by rounding).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from nanoiot.timer_wheel import TimerWheel

__all__ = ["Wakeups", "WakeupOwner", "wakeups_of"]


class WakeupOwner(Protocol):
    def wake_up(self) -> None:
        """Its wake-up time came (called from the reactor call, outside the owner's turn)."""


class Wakeups(TimerWheel[Any]):
    """``add(owner, at)`` / ``remove(owner, at)`` with ``at`` in epoch ms; an owner keeps track of what it added."""

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__(clock, resolution=0.001)

    def _due(self, owners: dict[Any, None]) -> None:
        self._tell(owners, "wake_up")


def wakeups_of(context: Any) -> Wakeups:
    """The context's wheel, made on first use (the context is built before its clock is known to run)."""
    wheel = context.wakeups
    if wheel is None:
        wheel = context.wakeups = Wakeups(context.clock)
    return wheel
