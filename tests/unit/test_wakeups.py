"""The device actors' shared wake-up wheel (nanoiot/actors/wakeups.py), on a task.Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from nanoiot.actors.wakeups import Wakeups

START = 1_700_000_000.0


class Owner:
    def __init__(self, name: str, woken: list[str], then: Any = None) -> None:
        self.name, self.woken, self.then = name, woken, then

    def wake_up(self) -> None:
        self.woken.append(self.name)
        if self.then is not None:
            self.then()


def clock_at(seconds: float = START) -> task.Clock:
    clock = task.Clock()
    clock.advance(seconds)
    return clock


def ms(clock: task.Clock, later: float) -> int:
    return int(clock.seconds() * 1000) + int(later * 1000)


def test_many_wake_ups_share_one_reactor_call_at_the_earliest_and_wake_in_time_order():
    clock, woken = clock_at(), []
    wheel = Wakeups(clock)
    for name, later in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)):
        wheel.add(Owner(name, woken), ms(clock, later))
    [call] = clock.getDelayedCalls()
    assert call.getTime() == START + 1.0
    clock.advance(1.0)
    assert woken == ["a", "a2"]
    [call] = clock.getDelayedCalls()
    assert call.getTime() == START + 2.0
    clock.advance(2.0)
    assert woken == ["a", "a2", "b", "c"]
    assert clock.getDelayedCalls() == [] and len(wheel) == 0


def test_later_wake_ups_arm_nothing_new_and_the_call_is_gone_once_none_is_left():
    clock, woken = clock_at(), []
    wheel = Wakeups(clock)
    owners = [Owner(str(i), woken) for i in range(3)]
    wheel.add(owners[0], ms(clock, 1.0))
    [first] = clock.getDelayedCalls()
    wheel.add(owners[1], ms(clock, 5.0))
    wheel.add(owners[2], ms(clock, 9.0))
    assert clock.getDelayedCalls() == [first]  # no callLater (nor cancel) for a later wake-up
    wheel.remove(owners[0], ms(clock, 1.0))
    assert clock.getDelayedCalls() == [first]  # left early: it finds nothing due and re-arms
    clock.advance(1.0)
    assert woken == []
    [second] = clock.getDelayedCalls()
    assert second.getTime() == START + 5.0
    wheel.remove(owners[1], ms(clock, 4.0))
    wheel.remove(owners[2], ms(clock, 8.0))
    assert clock.getDelayedCalls() == [] and len(wheel) == 0
    clock.advance(10.0)
    assert woken == []


def test_an_earlier_wake_up_moves_the_call_and_removing_a_woken_one_is_a_no_op():
    clock, woken = clock_at(), []
    wheel = Wakeups(clock)
    late, early = Owner("late", woken), Owner("early", woken)
    wheel.add(late, ms(clock, 5.0))
    wheel.add(early, ms(clock, 0.5))
    [call] = clock.getDelayedCalls()
    assert call.getTime() == START + 0.5
    clock.advance(0.5)
    assert woken == ["early"]
    wheel.remove(early, ms(clock, 0.0))  # already woken for it
    [call] = clock.getDelayedCalls()
    assert call.getTime() == START + 5.0


def test_a_wake_up_added_while_waking_is_armed_afterwards_and_a_failing_owner_spares_the_others():
    clock, woken = clock_at(), []
    wheel = Wakeups(clock)
    again = Owner("again", woken)

    def rearm() -> None:
        wheel.add(again, ms(clock, 2.0))

    def broken() -> None:
        raise RuntimeError("bug")

    wheel.add(Owner("first", woken, rearm), ms(clock, 1.0))
    wheel.add(Owner("broken", woken, broken), ms(clock, 1.0))
    wheel.add(Owner("third", woken), ms(clock, 1.0))
    clock.advance(1.0)
    assert woken == ["first", "broken", "third"]
    [call] = clock.getDelayedCalls()
    assert call.getTime() == START + 3.0
    clock.advance(2.0)
    assert woken[-1] == "again"


def test_a_millisecond_whose_float_division_falls_short_still_wakes_on_its_call():
    # 1.001 / 0.001 is 1000.999...: the call armed for slot 1001 must wake it, not re-arm itself for ~0 s forever.
    clock = task.Clock()
    clock.advance(1.0)
    woken: list[str] = []
    wheel = Wakeups(clock)
    wheel.add(Owner("a", woken), 1001)
    clock.advance(0.001)
    assert woken == ["a"]
    assert clock.getDelayedCalls() == [] and len(wheel) == 0
