"""Keeping CPython's full garbage collections short while a fleet holds hundreds of thousands of objects.

A connected device costs about 32 GC-tracked objects (its socket, protocol, session, actor, mailbox, timers). A
full (generation 2) collection walks every tracked object: measured at 10,000 connected devices, 207 ms with the
reactor stopped — every command, PUBACK and keep-alive waits — and it grows with the fleet (amqtt's reached
~2 s at 10k connections in the peers study). Yet none of those objects ever needs the cyclic collector: with every
device disconnected and every actor passivated, ``gc.collect()`` found 0 unreachable objects (see
``tests/integration/test_collector.py``); they are all freed by reference counting.

So, as the fleet grows, the objects already alive are moved out of the collector's reach with ``gc.freeze()``:
after start-up (the import-time heap) and whenever the number of device actors has grown by a quarter (and at
least 1,000) since the last freeze, checked every second. Ramping 15,000 devices in: the longest full collection
went from 204 ms to 20 ms, and one after the ramp from 239 ms to 7 ms (BENCHMARKS.md, "Garbage collector"). Frozen objects are still freed when their reference count drops; only cyclic garbage that was alive
at a freeze would stay, and the test above keeps the device path free of it. Full collections that still take
long are logged (``gc_pause``), so an operator can see them.
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
    def __init__(self, clock: IReactorTime, population: Callable[[], int], interval: float = 1.0,
                 growth: float = 0.25, minimum: int = 1000, slow_ms: float = 100.0) -> None:
        self.clock = clock
        self.population = population
        self.interval = interval
        self.growth = growth
        self.minimum = minimum
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
        """Freeze if the fleet grew enough since the last freeze; True if it did."""
        alive = self.population()
        if alive - self.frozen_population >= max(self.minimum, self.growth * self.frozen_population):
            self.freeze()
            return True
        return False

    def freeze(self) -> None:
        alive = self.population()
        started = time.perf_counter()
        gc.freeze()
        self.freezes += 1
        self.frozen_population = alive
        log.debug("gc_freeze actors={actors} frozen={frozen} ms={ms:.2f}", actors=alive,
                  frozen=gc.get_freeze_count(), ms=(time.perf_counter() - started) * 1000)

    def _timing(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started_at) * 1000
        self.longest_full_ms = max(self.longest_full_ms, ms)
        if ms >= self.slow_ms:
            log.warn("gc_pause generation=2 ms={ms:.0f} collected={collected} frozen={frozen}", ms=ms,
                     collected=info.get("collected"), frozen=gc.get_freeze_count())
