"""The garbage-collector policy: gc.freeze() is only safe because a device's objects never need the cyclic
collector. The first test proves that on a real server (MQTT sessions, REST RPCs, passivated actors); the others
pin when the policy freezes."""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from nanoiot.collector import CollectorPolicy
from tests.fixtures.raw_mqtt import connect_raw
from tests.fixtures.server import make_config, start_server, with_timeout

DEVICES = 40


@pytest.fixture
def unfrozen() -> Any:
    yield
    gc.unfreeze()  # whatever a test froze goes back to the collector: the rest of the suite is one process


def directory_emptied(directory: Any) -> defer.Deferred:
    """Fires once the directory has forgotten every actor (all passivated): an event, not a poll."""
    emptied: defer.Deferred = defer.Deferred()
    original = directory.forget

    def forget(*args: Any) -> Any:
        result = original(*args)
        if len(directory) == 0 and not emptied.called:
            emptied.callback(None)
        return result

    directory.forget = forget
    return emptied


def module_of(obj: Any) -> str:
    return getattr(type(obj), "__module__", "") or ""


@pytest_twisted.ensureDeferred
async def test_device_sessions_rpcs_and_passivated_actors_leave_no_cyclic_garbage(tmp_path: Any) -> None:
    server = await start_server(make_config(f"sqlite:///{tmp_path / 'gc.db'}", jwt_key_file=str(tmp_path / "k"),
                                            device_idle_timeout=1))
    try:
        tenant_id = server.service.demo.devices[0][0].tenant_id  # type: ignore[union-attr]
        devices = []
        for i in range(DEVICES):
            device, credentials = await server.service.catalog.create_device(tenant_id, f"gc-{i}")
            raw = await with_timeout(defer.ensureDeferred(connect_raw(server.mqtt_port, credentials.credentials_id)))
            devices.append((device, raw))
        # Warm every path once (JWT, routes, first-use caches) before counting.
        await server.jwt("tenant")
        gc.collect()
        # Only what this test makes from here on counts: a server of an earlier test in this process may become
        # unreachable meanwhile (its last timers or pooled connections going), and that is not the device path.
        existing = {id(o) for o in gc.get_objects()}
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            emptied = directory_emptied(server.service.directory)
            for device, raw in devices:
                call = defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{device.id}",
                                                        body={"method": "ping", "params": {"n": 1}}))
                request_id, command, _ = await raw.next_command()
                assert command == {"method": "ping", "params": {"n": 1}}
                raw.answer(request_id, {"pong": 1})
                status, body = await with_timeout(call)
                assert (status, body) == (200, {"pong": 1})
            for _, raw in devices:
                raw.close()
                await raw.closed
            await with_timeout(emptied, 30)  # idle timeout 1 s: every actor passivates
            gc.collect()
            ours = Counter(type(o).__qualname__ for o in gc.garbage if id(o) not in existing
                           and module_of(o).startswith(("nanoiot", "twisted.internet", "twisted.web", "pykka")))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert ours == Counter(), f"cyclic garbage left by {DEVICES} devices: {ours.most_common(10)}"
    finally:
        await server.service.stopService()


def test_the_policy_freezes_at_start_and_then_each_time_the_fleet_grew_by_a_step(unfrozen: Any) -> None:
    clock = task.Clock()
    population = [0]
    policy = CollectorPolicy(clock, lambda: population[0], interval=1, step=1000)
    policy.start()
    try:
        assert policy.freezes == 1 and gc.get_freeze_count() > 0
        population[0] = 999
        clock.advance(1)
        assert policy.freezes == 1  # less than a step
        population[0] = 1000
        clock.advance(1)
        assert policy.freezes == 2 and policy.frozen_population == 1000
        population[0] = 1999
        clock.advance(1)
        assert policy.freezes == 2
        population[0] = 40_000
        clock.advance(1)
        assert policy.freezes == 3 and policy.frozen_population == 40_000
        population[0] = 10_000  # the fleet shrank: nothing to freeze, growth now counts from here
        clock.advance(1)
        assert policy.freezes == 3
        population[0] = 10_999
        clock.advance(1)
        assert policy.freezes == 3
        population[0] = 11_000
        clock.advance(1)
        assert policy.freezes == 4 and policy.frozen_population == 11_000
        population[0] = 12_000
        clock.advance(0.5)
        assert policy.freezes == 4  # checked once a second
        clock.advance(0.5)
        assert policy.freezes == 5
    finally:
        policy.stop()
    assert policy._timing not in gc.callbacks
    assert not clock.getDelayedCalls()


def test_a_slow_full_collection_is_logged_and_remembered(unfrozen: Any) -> None:
    policy = CollectorPolicy(task.Clock(), lambda: 0, slow_ms=0.0)
    logged: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(logged.append)
    policy.start()
    try:
        gc.collect()
    finally:
        policy.stop()
        globalLogPublisher.removeObserver(logged.append)
    assert policy.longest_full_ms > 0
    assert any(e.get("log_namespace") == "nanoiot.gc" and "gc_pause" in e.get("log_format", "") for e in logged)


def test_a_full_collection_that_starts_after_a_step_of_growth_freezes_first(unfrozen: Any) -> None:
    clock = task.Clock()
    population = [0]
    policy = CollectorPolicy(clock, lambda: population[0], interval=1, step=1000)
    policy.start()
    try:
        kept = [[i] for i in range(5000)]  # a step's worth of new devices' objects, created after the start
        frozen = gc.get_freeze_count()
        population[0] = 999
        gc.collect()
        assert policy.freezes == 1  # less than a step: the collection walks them
        population[0] = 1500
        gc.collect()  # no check came in between (the clock did not move): the collection's start froze them
        assert policy.freezes == 2 and policy.frozen_population == 1500
        assert gc.get_freeze_count() >= frozen + len(kept)
        gc.collect()
        clock.advance(1)
        assert policy.freezes == 2  # no growth since: neither the collection nor the check freezes again
    finally:
        policy.stop()
    population[0] = 10_000
    gc.collect()
    assert policy.freezes == 2  # a stopped policy leaves collections alone
