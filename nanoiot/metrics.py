"""Prometheus metrics of one server: what operators ask first — how many devices are connected and over what, how
commands end and how long they take, how much work waits, how long journal writes and full GC passes take.

Nothing here adds work per message: the commands' counters and latency histogram are plain ints moved by one tally
of the command event stream (which the actors already feed; no event object is made for it) and turned into
Prometheus families only when scraped (``_RpcCounts``), gauges are read by callbacks when Prometheus scrapes, the journal's batch writes are timed by
wrapping the repository the journal is given, and full collections by one ``gc.callbacks`` hook. Each server has its
own :class:`CollectorRegistry` (passed in), so several servers in one process — the tests — never collide.
"""

from __future__ import annotations

import gc
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from twisted.internet.interfaces import IReactorTime

from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.commands.presence import PresenceBook
from nanoiot.rpc.model import RpcStatus

#: The transports a device connects over (always exported, zero included, so that dashboards find the series).
TRANSPORTS = ("mqtt", "http", "coap")

#: Submit → final outcome: a command lives from milliseconds (an online device) to its whole timeout (minutes).
RPC_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
#: One journal transaction: a commit on a local SQLite file is about a millisecond, a loaded PostgreSQL far more.
JOURNAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: A full collection of a large heap: from under a millisecond (frozen fleet) to seconds (see nanoiot/collector.py).
GC_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Gauge = Callable[[], float]


class ServerMetrics:
    """The metrics of one server, in ``registry``. ``clock`` is the reactor (commands' latency is measured on the
    same clock that stamped their ``createdTime``); ``node`` this node's name in a cluster ("" alone), so that only
    the devices this node holds are counted."""

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime, node: str = "",
                 process: bool = True) -> None:
        self.registry = registry
        self.clock = clock
        self.node = node
        #: Status changes, outcomes and latency of commands: plain ints, exported at scrape time.
        self.rpc = _RpcCounts(clock)
        registry.register(self.rpc)
        self.journal_write = Histogram(
            "nanoiot_journal_write_seconds", "Seconds one journal batch (one transaction) took to write",
            buckets=JOURNAL_BUCKETS, registry=registry)
        self.journal_failures = Counter(
            "nanoiot_journal_write_failures", "Journal batches whose write failed", registry=registry)
        self.gc_pause = Histogram(
            "nanoiot_gc_full_pause_seconds", "Seconds each full (generation 2) garbage collection stopped the server",
            buckets=GC_BUCKETS, registry=registry)
        self._gauges: dict[str, tuple[str, Gauge]] = {}
        #: Which devices have a session here (set by :meth:`start`).
        self.presence: PresenceBook | None = None
        self._gc_started = 0.0
        self._unsubscribe: Callable[[], None] | None = None
        registry.register(_ScrapeTime(self))
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    # --- lifecycle --------------------------------------------------------------------------------------------------

    def start(self, events: EventStream, presence: PresenceBook) -> None:
        """Listen to the command events and time full collections (until :meth:`stop`)."""
        self.presence = presence
        self._unsubscribe = events.tally(self.rpc.count)
        if self._gc_timing not in gc.callbacks:
            gc.callbacks.append(self._gc_timing)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._gc_timing in gc.callbacks:
            gc.callbacks.remove(self._gc_timing)

    # --- gauges read at scrape time ---------------------------------------------------------------------------------

    def gauge(self, name: str, documentation: str, read: Gauge) -> None:
        """Export ``read()`` as the gauge ``name``, read at each scrape (a failing read leaves the gauge out)."""
        self._gauges[name] = (documentation, read)

    def devices_connected(self) -> dict[str, int]:
        counts = dict.fromkeys(TRANSPORTS, 0)
        if self.presence is not None:
            counts.update(self.presence.by_transport())
        return counts

    # --- the command events -----------------------------------------------------------------------------------------

    def on_event(self, event: Any) -> None:
        """One event counted as the tally counts it (what :meth:`start` subscribes is the tally itself)."""
        if type(event) is RpcStatusChanged:
            self.rpc.count(event.status, event.persistent, event.created_time)

    # --- journal writes and collections ---------------------------------------------------------------------------

    def timed_repository(self, repository: Any) -> Any:
        """``repository`` with its ``write_rpc_batch`` timed: what the journal is given, so it needs no hook."""
        return _TimedBatches(repository, self)

    def _gc_timing(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_pause.observe(time.perf_counter() - self._gc_started)
            self._gc_started = 0.0


#: The outcomes whose latency is observed (a deletion is the caller's doing, not the command's latency).
_LATENCY_OUTCOMES = (RpcStatus.SUCCESSFUL, RpcStatus.EXPIRED, RpcStatus.FAILED)
_LATENCY_BOUNDS = (*RPC_LATENCY_BUCKETS, math.inf)


class _RpcCounts(Collector):
    """``nanoiot_rpc_status_changes_total``, ``nanoiot_rpcs_total`` and ``nanoiot_rpc_latency_seconds``, exported
    exactly as prometheus_client's Counter and Histogram would (``_created`` samples included), but counted in
    plain ints: :meth:`count` runs four times per command on the reactor thread, and a labelled prometheus_client
    child takes a lock per ``inc`` and per ``observe``. A series appears with its first count, as a child does."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: persistent -> status -> changes (every key present: a scrape from another thread sees no resize).
        self.changes: dict[bool, dict[RpcStatus, int]] = {False: dict.fromkeys(RpcStatus, 0),
                                                           True: dict.fromkeys(RpcStatus, 0)}
        #: (status, persistent, when its series began: wall clock, as prometheus_client's ``_created``), in the
        #: order the series began (the order a scrape lists them in, as for labelled children).
        self.series: list[tuple[RpcStatus, bool, float]] = []
        #: outcome -> observations per bucket (not cumulative; the last is +Inf), their sum, when it began.
        self.buckets: dict[RpcStatus, list[int]] = {s: [0] * len(_LATENCY_BOUNDS) for s in _LATENCY_OUTCOMES}
        self.sums: dict[RpcStatus, float] = dict.fromkeys(_LATENCY_OUTCOMES, 0.0)
        self.latency_created: dict[RpcStatus, float | None] = dict.fromkeys(_LATENCY_OUTCOMES, None)
        self.latency_series: list[RpcStatus] = []

    def count(self, status: RpcStatus, persistent: bool, created_time: int) -> None:
        """One status change (the event stream's tally)."""
        changes = self.changes[persistent]
        n = changes[status]
        if not n:
            self.series.append((status, persistent, time.time()))
        changes[status] = n + 1
        buckets = self.buckets.get(status)
        if buckets is not None:
            seconds = self.clock.seconds() - created_time / 1000
            if seconds < 0.0:
                seconds = 0.0
            if self.latency_created[status] is None:
                self.latency_created[status] = time.time()
                self.latency_series.append(status)
            buckets[bisect_left(_LATENCY_BOUNDS, seconds)] += 1
            self.sums[status] += seconds

    def describe(self) -> Iterable[Any]:
        return []  # families of their own names, read at every scrape

    def collect(self) -> Iterator[Metric]:
        changes = CounterMetricFamily(
            "nanoiot_rpc_status_changes", "Status changes of device commands, by the status reached "
            "(QUEUED, SENT, DELIVERED, SUCCESSFUL, TIMEOUT, EXPIRED, FAILED, DELETED)", labels=["status", "persistent"])
        outcomes = CounterMetricFamily(
            "nanoiot_rpcs", "Device commands that ended, by outcome (SUCCESSFUL, EXPIRED, FAILED, DELETED)",
            labels=["outcome", "persistent"])
        for status, persistent, created in list(self.series):
            labels = [status.value, "true" if persistent else "false"]
            value = float(self.changes[persistent][status])
            changes.add_metric(labels, value, created=created)
            if status.is_terminal:
                outcomes.add_metric(labels, value, created=created)
        yield changes
        yield outcomes
        latency = HistogramMetricFamily("nanoiot_rpc_latency_seconds",
                                        "Seconds from a command's submission to its final outcome", labels=["outcome"])
        for status in list(self.latency_series):
            created = self.latency_created[status]
            cumulative, running = [], 0
            for bound, n in zip(_LATENCY_BOUNDS, list(self.buckets[status])):
                running += n
                cumulative.append((floatToGoString(bound), float(running)))
            latency.add_metric([status.value], cumulative, self.sums[status])
            # Where prometheus_client's Histogram keeps it: in the family (the text format lists it apart).
            latency.samples.append(Sample("nanoiot_rpc_latency_seconds_created", {"outcome": status.value}, created))
        yield latency


class _TimedBatches:
    """A repository whose batch writes are observed; every other attribute is the repository's own."""

    def __init__(self, repository: Any, metrics: ServerMetrics) -> None:
        self._repository = repository
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repository, name)

    def write_rpc_batch(self, *args: Any, **kwargs: Any) -> Any:
        metrics = self._metrics
        started = metrics.clock.seconds()

        def written(result: Any) -> Any:
            metrics.journal_write.observe(max(0.0, metrics.clock.seconds() - started))
            return result

        def failed(failure: Any) -> Any:
            metrics.journal_failures.inc()
            return failure

        return self._repository.write_rpc_batch(*args, **kwargs).addCallbacks(written, failed)


class _ScrapeTime(Collector):
    """The gauges that are read, not counted: connected devices by transport and the callbacks' values."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # read at every scrape: nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = GaugeMetricFamily("nanoiot_devices_connected", "Devices connected to this node, by the "
                                    "transport of the session that brought them online", labels=["transport"])
        for transport, count in sorted(self.metrics.devices_connected().items()):
            devices.add_metric([transport], count)
        yield devices
        for name, (documentation, read) in list(self.metrics._gauges.items()):
            try:
                value = float(read())
            except Exception:
                continue
            yield GaugeMetricFamily(name, documentation, value=value)


def pending_commands(actors: Iterable[Any]) -> int:
    """Commands waiting in device actors' queues, summed at scrape time (on the reactor thread, where the actors
    run): ``actors`` are the directory's actor references. O(actors), once per scrape, never per message."""
    total = 0
    for ref in actors:
        actor = getattr(ref.actor_inbox, "actor", None)  # a ReactorActor's mailbox knows its actor until teardown
        queue = getattr(actor, "queue", None)
        if queue is not None:
            total += len(queue)
    return total
