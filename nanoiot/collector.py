"""Keeping CPython's full garbage collections short while a fleet holds hundreds of thousands of objects.

A connected device costs about 32 GC-tracked objects (its socket, protocol, session, actor, mailbox, timers). A
full (generation 2) collection walks every tracked object: measured at 10,000 connected devices, 207 ms with the
reactor stopped — every command, PUBACK and keep-alive waits — and it grows with the fleet (amqtt's reached
~2 s at 10k connections in the peers study). Yet none of those objects ever needs the cyclic collector: with every
device disconnected and every actor passivated, ``gc.collect()`` found 0 unreachable objects (see
``tests/integration/test_collector.py``); they are all freed by reference counting.

So, as the fleet grows, the objects already alive are moved out of the collector's reach with ``gc.freeze()``:
after start-up (the import-time heap) and whenever there are 1,000 more device actors than at the last freeze (or
than the fleet's low point since), checked every 0.25 s. A freeze only moves lists, so it is cheap to do often,
and the objects still unfrozen — what a full collection walks — stay at about a quarter second's worth of new
devices (checked every second, a 10,000-device connect storm still met three full collections of 31-85 ms; every
0.25 s, none over 20 ms). The same check also runs as a full collection starts: a storm's collections then walk
at most a step's worth of new devices (``bench/fleet_memory.py``: 7 full collections of up to 52-64 ms in a
20,000-device ramp before, 4-5 of under 1 ms after).
Measured with 100,000 devices (``bench/fleet_memory.py``, BENCHMARKS.md): a full collection after the ramp takes
under 1 ms instead of 1.4 s, and 75 ms at most during it instead of 1.3 s. Frozen objects are still freed when
their reference count drops; only cyclic garbage that was alive at a freeze would stay, and the test above keeps
the device path free of it. Full collections that still take 20 ms or more (the bound issue 12 sets) are logged
(``gc_pause``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="nanoiot.gc")


class CollectorPolicy:
    def __init__(self, clock: IReactorTime, population: Callable[[], int], interval: float = 0.25,
                 step: int = 1000, slow_ms: float = 20.0) -> None:
        self.clock = clock
        self.population = population
        self.interval = interval
        self.step = step
        self.slow_ms = slow_ms
        self.frozen_population = 0
        self.freezes = 0
        #: The longest full collection seen since start, ms.
        self.longest_full_ms = 0.0
        self._started_at = 0.0
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        self.freeze()
        gc.callbacks.append(self._timing)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._timing in gc.callbacks:
            gc.callbacks.remove(self._timing)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> bool:
        """Freeze if the fleet grew by ``step`` actors since the last freeze (or its low point since); True if so."""
        alive = self.population()
        # A fleet that shrank and grows again counts its growth from the low point: its new objects are unfrozen.
        self.frozen_population = min(self.frozen_population, alive)
        if alive - self.frozen_population >= self.step:
            self.freeze()
            return True
        return False

    def freeze(self) -> None:
        alive = self.population()
        started = time.perf_counter()
        gc.freeze()
        self.freezes += 1
        self.frozen_population = alive
        # Not gc.get_freeze_count(): it walks every frozen object (18 % of the CPU of a 100,000-device bulk RPC).
        log.debug("gc_freeze actors={actors} ms={ms:.2f}", actors=alive, ms=(time.perf_counter() - started) * 1000)

    def _timing(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            # A full collection is about to walk every unfrozen object. If the fleet grew by a step since the last
            # freeze, the freeze the next check would make is made now, and the collection walks what little is
            # left instead of the new devices' objects (in a connect storm, 30-40 ms each at 10,000 devices/s).
            if self._loop is not None:
                self.check()
            self._started_at = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started_at) * 1000
        self.longest_full_ms = max(self.longest_full_ms, ms)
        if ms >= self.slow_ms:
            log.warn("gc_pause generation=2 ms={ms:.0f} collected={collected}", ms=ms,
                     collected=info.get("collected"))
