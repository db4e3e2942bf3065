"""Behaviour of the reactor actor runtime, and of the Pykka private API it relies on (pykka>=4.5,<4.6).

Most tests drive a ``task.Clock`` (``clock.advance(0)`` runs every due drain turn; ``clock.turn()`` runs exactly
one reactor turn) with a fake timer for the per-turn budget, inside an isolated actor registry.
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

import pykka
import pytest
import pytest_twisted
from pykka import ActorDeadError, ActorRef, ActorRegistry
from pykka._envelope import Envelope
from pykka.messages import _ActorStop
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nanoiot.actors.runtime import (
    Dispatcher,
    ReactorActor,
    ReactorFuture,
    RefTable,
    ask_deferred,
    get_dispatcher,
    install_fast_registry,
    set_dispatcher,
    stop_all_deferred,
    stop_deferred,
)

# --- harness --------------------------------------------------------------------------------------------------------


class FakeTimer:
    """The dispatcher's budget clock: it only moves when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ReactorClock(task.Clock):
    """A Clock that also takes calls from threads (queued until the test runs them) and can run ONE turn.

    ``Clock.advance(0)`` also runs calls scheduled while it runs; a real reactor runs those on its next turn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # Twisted's interface name
        self.from_threads.put((f, args, kwargs))

    def run_thread_call(self) -> None:
        """Run the next call handed over by another thread (waits for it: the guard timeout is not a sleep)."""
        f, args, kwargs = self.from_threads.get(timeout=10)
        f(*args, **kwargs)

    def turn(self) -> None:
        """One reactor turn: run the calls due now, not the ones they schedule."""
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def result_of(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any]) -> Failure:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"the Deferred succeeded with {box[0]!r}"
    return box[0]


def in_thread(f: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``f`` in a worker thread; the list receives ("ok", value) or ("error", exception)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", f()))
        except BaseException as exc:  # noqa: BLE001
            outcome.append(("error", exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, outcome


def reactor_actors() -> list[ActorRef[Any]]:
    return [ref for ref in ActorRegistry.get_all() if issubclass(ref.actor_class, ReactorActor)]


class Probe(ReactorActor):
    """Journals its life. A callable message is called with the actor and its result is the reply."""

    def __init__(self, journal: list[Any] | None = None, name: str = "probe") -> None:
        super().__init__()
        self.journal = journal if journal is not None else []
        self.name = name

    def on_start(self) -> None:
        self.journal.append((self.name, "start"))

    def on_stop(self) -> None:
        self.journal.append((self.name, "stop"))

    def on_failure(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        self.journal.append((self.name, "failure", exc_type))

    def on_receive(self, message: Any) -> Any:
        if callable(message):
            return message(self)
        self.journal.append(message)
        return message

    def double(self, x: int) -> int:
        return 2 * x


def boom(actor: Probe) -> None:
    raise ValueError("boom")


class Halt(BaseException):
    pass


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[RefTable]:
    """A private ActorRegistry table, so that no test here sees or stops another module's actors."""
    table = RefTable()
    monkeypatch.setattr(ActorRegistry, "_actor_refs", table)
    yield table


@pytest.fixture
def timer() -> FakeTimer:
    return FakeTimer()


@pytest.fixture
def clock(isolated_registry: RefTable, timer: FakeTimer) -> Iterator[ReactorClock]:
    """A fresh Dispatcher on a Clock as the process default; afterwards every actor is stopped and nothing is left."""
    clock = ReactorClock()
    set_dispatcher(Dispatcher(clock, timer=timer))
    try:
        yield clock
        while not clock.from_threads.empty():
            clock.run_thread_call()
        d = stop_all_deferred()
        clock.advance(0)
        result_of(d)
        assert reactor_actors() == []
        assert clock.getDelayedCalls() == []
    finally:
        set_dispatcher(None)


# --- the Pykka private API we rely on -------------------------------------------------------------------------------


def test_pykka_is_the_pinned_minor_version() -> None:
    assert version("pykka").startswith("4.5.")


def test_pykka_actor_has_exactly_the_three_runtime_hooks_as_abstract_methods() -> None:
    assert pykka.Actor.__abstractmethods__ == {"_create_actor_inbox", "_create_future", "_start_actor_loop"}


def test_pykka_actor_init_sets_exactly_the_attributes_reactor_actor_init_sets(clock: ReactorClock) -> None:
    class Threaded(pykka.ThreadingActor):
        pass

    class Bare(ReactorActor):
        pass

    expected = {"actor_urn", "actor_inbox", "actor_stopped", "_actor_ref"}
    assert set(vars(Threaded())) == expected  # not started: no thread
    assert set(vars(Bare())) == expected  # not started: not registered


def test_pykka_future_init_sets_only_the_get_hook_attributes() -> None:
    class Plain(pykka.Future[Any]):
        pass

    assert set(vars(Plain())) == {"_get_hook", "_get_hook_result"}


def test_actor_refs_hash_and_compare_by_identity() -> None:
    assert ActorRef.__hash__ is object.__hash__
    assert ActorRef.__eq__ is object.__eq__


def test_pykka_actor_keeps_the_private_loop_methods_the_runtime_reuses() -> None:
    for name in ("_handle_receive", "_handle_failure", "_stop", "_actor_loop_setup", "_actor_loop_teardown"):
        assert callable(getattr(pykka.Actor, name)), name
    assert Envelope.__slots__ == ["message", "reply_to"]


def test_actor_ref_copies_the_inbox_and_the_stopped_flag_of_the_actor(clock: ReactorClock) -> None:
    actor = Probe()
    ref = actor.actor_ref
    assert ref.actor_inbox is actor.actor_inbox
    assert ref.actor_stopped is actor.actor_stopped
    assert not isinstance(ref.actor_stopped, threading.Event)


def test_actor_ref_stop_without_blocking_gives_a_get_hook_future_readable_once_stopped(clock: ReactorClock) -> None:
    ref = Probe.start()
    stopping = ref.stop(block=False)
    assert isinstance(stopping, ReactorFuture)
    clock.advance(0)
    assert stopping.get() is True
    assert ref.stop(block=False).get() is False


# --- lifecycle and ordering -----------------------------------------------------------------------------------------


def test_start_schedules_on_start_on_the_dispatcher_instead_of_running_it_inline(clock: ReactorClock) -> None:
    journal: list[Any] = []
    Probe.start(journal)
    assert journal == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert journal == [("probe", "start")]


def test_on_start_runs_before_the_first_message_even_when_mail_arrived_first(clock: ReactorClock) -> None:
    journal: list[Any] = []

    class EarlyMail(Probe):
        def __init__(self) -> None:
            super().__init__(journal)
            self.actor_ref.tell("sent from __init__")

    ref = EarlyMail.start()
    ref.tell("sent after start")
    clock.advance(0)
    assert journal == [("probe", "start"), "sent from __init__", "sent after start"]


def test_mail_to_an_actor_object_that_was_never_started_is_not_handled(clock: ReactorClock) -> None:
    journal: list[Any] = []
    unstarted = Probe(journal)
    unstarted.actor_ref.tell("hello")
    clock.advance(0)
    assert journal == []
    assert clock.getDelayedCalls() == []


def test_a_thousand_tells_are_handled_in_fifo_order(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    for i in range(1000):
        ref.tell(i)
    clock.advance(0)
    assert journal == [("probe", "start"), *range(1000)]


def test_a_tell_on_the_reactor_thread_queues_the_bare_message_and_keeps_order_with_asks(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    ref.tell("one")
    asked = ask_deferred(ref, "two")
    ref.tell("three")
    mail = list(ref.actor_inbox._mail)
    assert mail[0] == "one" and type(mail[1]) is Envelope and mail[2] == "three"  # no Envelope for a tell
    clock.advance(0)
    assert journal == [("probe", "start"), "one", "two", "three"]
    assert result_of(asked) == "two"


def test_pykkas_own_messages_told_still_reach_pykka_and_a_tuple_message_reaches_on_receive(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    ref.proxy().on_receive.defer("by proxy")  # a ProxyCall told: Pykka's _handle_receive runs it
    ref.tell(("a", "tuple"))  # a tuple that is not one of Pykka's messages: on_receive, as before
    ref.tell(_ActorStop())  # Pykka's stop message told
    clock.advance(0)
    assert journal == [("probe", "start"), "by proxy", ("a", "tuple"), ("probe", "stop")]
    assert not ref.is_alive()


def test_a_class_that_overrides_pykkas_handle_receive_gets_every_told_message_there(clock: ReactorClock) -> None:
    class Intercepting(Probe):
        def _handle_receive(self, message: Any) -> Any:
            self.journal.append(("intercepted", message))
            return super()._handle_receive(message)

    journal: list[Any] = []
    ref = Intercepting.start(journal)
    ref.tell("told")
    clock.advance(0)
    assert journal == [("probe", "start"), ("intercepted", "told"), "told"]
    assert Probe._plain_receive and not Intercepting._plain_receive


def test_the_inbox_gives_pykka_an_envelope_for_a_bare_tell(clock: ReactorClock) -> None:
    ref = Probe.start()
    ref.tell("told")
    asked = ref.ask("asked", block=False)
    inbox = ref.actor_inbox
    told = inbox.get()
    assert type(told) is Envelope and told.message == "told" and told.reply_to is None
    assert inbox.get().reply_to is asked
    assert inbox.empty()


def test_a_tell_from_another_thread_hops_to_the_reactor_in_an_envelope(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    worker, outcome = in_thread(lambda: ref.tell("from a thread"))
    worker.join(10)
    assert outcome == [("ok", None)]
    clock.run_thread_call()
    assert type(ref.actor_inbox._mail[0]) is Envelope
    clock.advance(0)
    assert journal == [("probe", "start"), "from a thread"]


def test_a_single_drain_is_scheduled_however_many_actors_have_mail(clock: ReactorClock) -> None:
    refs = [Probe.start() for _ in range(100)]
    for ref in refs:
        ref.tell("hello")
        ref.tell("again")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert get_dispatcher().pending == 0


def test_the_per_turn_budget_yields_to_the_reactor_and_the_rest_runs_next_turn(
    clock: ReactorClock, timer: FakeTimer
) -> None:
    budgeted = Dispatcher(clock, budget=5.0, timer=timer)

    class Slow(Probe):
        dispatcher = budgeted

    journal: list[Any] = []
    ref = Slow.start(journal)
    clock.turn()

    def costly(i: int) -> Callable[[Probe], None]:
        def step(actor: Probe) -> None:
            timer.now += 1.0  # each message "takes" one budget unit
            actor.journal.append(i)

        return step

    for i in range(12):
        ref.tell(costly(i))
    clock.turn()
    assert journal[1:] == [0, 1, 2, 3, 4]
    [next_turn] = clock.getDelayedCalls()
    assert next_turn.getTime() == clock.seconds()  # callLater(0): the reactor gets its turn first
    clock.turn()
    assert journal[1:] == list(range(10))
    clock.turn()
    assert journal[1:] == list(range(12))
    assert clock.getDelayedCalls() == []


def test_actors_take_turns_in_batches_so_a_busy_actor_cannot_starve_another(clock: ReactorClock) -> None:
    journal: list[Any] = []
    a = Probe.start(journal, "a")
    b = Probe.start(journal, "b")
    clock.advance(0)
    del journal[:]
    for i in range(200):
        a.tell(("a", i))
    for i in range(200):
        b.tell(("b", i))
    clock.advance(0)
    batch = get_dispatcher().batch
    expected = []
    for start in range(0, 200, batch):
        expected += [("a", i) for i in range(start, min(start + batch, 200))]
        expected += [("b", i) for i in range(start, min(start + batch, 200))]
    assert batch == 64
    assert journal == expected


def test_an_actor_class_can_run_on_its_own_dispatcher(clock: ReactorClock) -> None:
    other_clock = task.Clock()
    own = Dispatcher(other_clock)

    class Elsewhere(Probe):
        dispatcher = own

    journal: list[Any] = []
    ref = Elsewhere.start(journal)
    clock.advance(0)
    assert journal == []
    other_clock.advance(0)
    assert journal == [("probe", "start")]
    d = stop_deferred(ref)
    other_clock.advance(0)
    assert result_of(d) is True
    assert other_clock.getDelayedCalls() == []


def test_get_dispatcher_is_created_lazily_and_set_dispatcher_none_resets_it(isolated_registry: RefTable) -> None:
    mine = Dispatcher(task.Clock())
    set_dispatcher(mine)
    try:
        assert get_dispatcher() is mine
        set_dispatcher(None)
        default = get_dispatcher()
        assert default is not mine
        assert get_dispatcher() is default
        from twisted.internet import reactor

        assert default.reactor is reactor
    finally:
        set_dispatcher(None)


# --- asks, futures and Deferreds ------------------------------------------------------------------------------------


def test_ask_returns_the_value_through_to_deferred(clock: ReactorClock) -> None:
    ref = Probe.start()
    d = ref.ask("ping", block=False).to_deferred()
    assert not d.called
    clock.advance(0)
    assert result_of(d) == "ping"


def test_ask_returns_the_value_through_await_inside_ensure_deferred(clock: ReactorClock) -> None:
    ref = Probe.start()

    async def caller() -> Any:
        return await ref.ask("ping", block=False)

    d = defer.ensureDeferred(caller())
    assert not d.called
    clock.advance(0)
    assert result_of(d) == "ping"


def test_await_on_a_proxy_method_returns_its_result(clock: ReactorClock) -> None:
    proxy = Probe.start().proxy()

    async def caller() -> Any:
        return await proxy.double(21)

    d = defer.ensureDeferred(caller())
    clock.advance(0)
    assert result_of(d) == 42


def test_ask_deferred_turns_an_ask_into_a_deferred_and_a_dead_actor_into_a_failure(clock: ReactorClock) -> None:
    ref = Probe.start()
    d = ask_deferred(ref, "ping")
    clock.advance(0)
    assert result_of(d) == "ping"
    stopping = stop_deferred(ref)
    clock.advance(0)
    assert result_of(stopping) is True
    failure_of(ask_deferred(ref, "ping")).trap(ActorDeadError)


def test_an_ask_exception_reaches_the_caller_and_the_actor_keeps_running(clock: ReactorClock) -> None:
    ref = Probe.start()
    failed = ask_deferred(ref, boom)
    clock.advance(0)
    assert failure_of(failed).check(ValueError)
    assert ref.is_alive()
    later = ask_deferred(ref, "still here")
    clock.advance(0)
    assert result_of(later) == "still here"


def test_get_on_the_reactor_thread_before_completion_raises_instead_of_deadlocking(clock: ReactorClock) -> None:
    ref = Probe.start()
    future = ref.ask("ping", block=False)
    with pytest.raises(RuntimeError, match="would block the reactor"):
        future.get()
    clock.advance(0)
    assert future.get() == "ping"


def test_blocking_ask_and_stop_on_the_reactor_thread_raise_runtime_error(clock: ReactorClock) -> None:
    ref = Probe.start()
    with pytest.raises(RuntimeError, match="would block the reactor"):
        ref.ask("ping")
    with pytest.raises(RuntimeError, match="would block the reactor"):
        ref.stop()
    clock.advance(0)  # both messages were sent before get() refused to wait: the actor is now stopped
    assert not ref.is_alive()


def test_blocking_get_from_another_thread_returns_once_the_reactor_completes_the_future(
    clock: ReactorClock,
) -> None:
    ref = Probe.start()
    clock.advance(0)
    worker, outcome = in_thread(lambda: ref.ask("ping", timeout=10))
    clock.run_thread_call()  # the worker's envelope hops to the reactor thread
    clock.advance(0)  # handled: the future is completed on the reactor thread and wakes the worker
    worker.join(10)
    assert outcome == [("ok", "ping")]


def test_get_from_another_thread_times_out_with_pykka_timeout(clock: ReactorClock) -> None:
    future: ReactorFuture[Any] = ReactorFuture(get_dispatcher())
    worker, outcome = in_thread(lambda: future.get(timeout=0))
    worker.join(10)
    [(kind, exc)] = outcome
    assert kind == "error"
    assert isinstance(exc, pykka.Timeout)


def test_setting_a_future_from_another_thread_completes_it_on_the_reactor_thread(clock: ReactorClock) -> None:
    future: ReactorFuture[Any] = ReactorFuture(get_dispatcher())
    d = future.to_deferred()
    worker, outcome = in_thread(lambda: future.set(5))
    worker.join(10)
    assert outcome == [("ok", None)]
    assert not future.done()
    assert not d.called
    clock.run_thread_call()
    assert result_of(d) == 5


def test_setting_a_future_twice_raises_queue_full(clock: ReactorClock) -> None:
    future: ReactorFuture[Any] = ReactorFuture(get_dispatcher())
    future.set(1)
    with pytest.raises(queue.Full):
        future.set(2)
    with pytest.raises(queue.Full):
        future.set_exception((ValueError, ValueError("late"), None))
    assert future.get() == 1


def test_an_exception_set_on_a_future_is_raised_by_get_and_errbacks_its_deferreds(clock: ReactorClock) -> None:
    future: ReactorFuture[Any] = ReactorFuture(get_dispatcher())
    d = future.to_deferred()
    try:
        raise KeyError("missing")
    except KeyError:
        future.set_exception()
    assert failure_of(d).check(KeyError)
    with pytest.raises(KeyError):
        future.get()
    assert failure_of(future.to_deferred()).check(KeyError)


def test_a_cancelled_deferred_is_forgotten_by_its_future(clock: ReactorClock) -> None:
    future: ReactorFuture[Any] = ReactorFuture(get_dispatcher())
    given_up = future.to_deferred()
    kept = future.to_deferred()
    given_up.cancel()
    failure_of(given_up).trap(defer.CancelledError)
    future.set("late")
    assert result_of(kept) == "late"


def test_map_filter_reduce_and_join_complete_without_blocking(clock: ReactorClock) -> None:
    dispatcher = get_dispatcher()
    numbers: ReactorFuture[Any] = ReactorFuture(dispatcher)
    other: ReactorFuture[Any] = ReactorFuture(dispatcher)
    mapped = numbers.map(len)
    filtered = numbers.filter(lambda n: n > 1)
    reduced = numbers.reduce(lambda acc, n: acc + n, 10)
    joined = numbers.join(other)
    assert not any(f.done() for f in (mapped, filtered, reduced, joined))
    numbers.set([1, 2, 3])
    other.set("x")
    assert mapped.get() == 3
    assert filtered.get() == [2, 3]
    assert reduced.get() == 16
    assert joined.get() == [[1, 2, 3], "x"]


def test_map_and_join_carry_exceptions_to_the_derived_future(clock: ReactorClock) -> None:
    dispatcher = get_dispatcher()
    source: ReactorFuture[Any] = ReactorFuture(dispatcher)
    failing: ReactorFuture[Any] = ReactorFuture(dispatcher)
    mapped = source.map(lambda value: 1 / value)
    joined = source.join(failing)
    source.set(0)
    failing.set_exception((KeyError, KeyError("k"), None))
    with pytest.raises(ZeroDivisionError):
        mapped.get()
    with pytest.raises(KeyError):
        joined.get()


def test_a_handler_returning_a_deferred_completes_the_ask_later_without_holding_the_mailbox(
    clock: ReactorClock,
) -> None:
    ref = Probe.start()
    pending: Deferred[str] = Deferred()
    slow = ref.ask(lambda actor: pending, block=False)
    fast = ref.ask("fast", block=False)
    clock.advance(0)
    assert not slow.done()
    assert fast.get() == "fast"  # handled while the first ask is still in flight
    pending.callback("slow")
    assert slow.get() == "slow"


def test_a_failed_deferred_from_a_handler_fails_the_ask_and_the_actor_keeps_running(clock: ReactorClock) -> None:
    ref = Probe.start()
    pending: Deferred[str] = Deferred()
    answer = ask_deferred(ref, lambda actor: pending)
    clock.advance(0)
    pending.errback(ValueError("device said no"))
    assert failure_of(answer).check(ValueError)
    assert ref.is_alive()


def test_a_failed_deferred_from_a_tell_calls_on_failure_and_stops_the_actor(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    pending: Deferred[None] = Deferred()
    ref.tell(lambda actor: pending)
    clock.advance(0)
    assert ref.is_alive()
    pending.errback(ValueError("lost"))
    assert journal[-1] == ("probe", "failure", ValueError)
    assert not ref.is_alive()
    assert reactor_actors() == []
    with pytest.raises(ActorDeadError):
        ref.tell("too late")


def test_a_tell_deferred_failing_inside_the_actors_own_turn_fails_the_asks_queued_behind(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    pending: Deferred[None] = Deferred()
    ref.tell(lambda actor: pending)
    ref.tell(lambda actor: pending.errback(ValueError("lost")))
    queued = ask_deferred(ref, "queued")
    clock.advance(0)
    assert journal[-1] == ("probe", "failure", ValueError)
    failure_of(queued).trap(ActorDeadError)


# --- errors and stopping --------------------------------------------------------------------------------------------


def test_a_tell_exception_calls_on_failure_stops_the_actor_and_fails_queued_asks(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    ref.tell(boom)
    queued = ask_deferred(ref, "queued")
    stopping = stop_deferred(ref)
    clock.advance(0)
    assert journal == [("probe", "start"), ("probe", "failure", ValueError)]
    assert not ref.is_alive()
    assert reactor_actors() == []
    failure_of(queued).trap(ActorDeadError)
    assert result_of(stopping) is True  # like Pykka's teardown: a queued stop is answered, not failed


def test_an_on_start_exception_stops_the_actor_and_fails_queued_asks(clock: ReactorClock) -> None:
    class BadStart(Probe):
        def on_start(self) -> None:
            raise ValueError("no")

    ref = BadStart.start()
    queued = ask_deferred(ref, "queued")
    clock.advance(0)
    assert not ref.is_alive()
    failure_of(queued).trap(ActorDeadError)


def test_stop_deferred_returns_true_then_false(clock: ReactorClock) -> None:
    ref = Probe.start()
    first = stop_deferred(ref)
    clock.advance(0)
    assert result_of(first) is True
    assert result_of(stop_deferred(ref)) is False


def test_a_stop_is_handled_after_the_mail_queued_before_it(clock: ReactorClock) -> None:
    journal: list[Any] = []
    ref = Probe.start(journal)
    ref.tell("one")
    ref.tell("two")
    stopping = stop_deferred(ref)
    clock.advance(0)
    assert journal == [("probe", "start"), "one", "two", ("probe", "stop")]
    assert result_of(stopping) is True


def test_tell_after_stop_raises_actor_dead_error(clock: ReactorClock) -> None:
    ref = Probe.start()
    stop_deferred(ref)
    clock.advance(0)
    with pytest.raises(ActorDeadError):
        ref.tell("hello")


def test_mail_that_hops_from_a_thread_after_the_stop_is_answered_like_pykka_teardown(clock: ReactorClock) -> None:
    ref = Probe.start()
    clock.advance(0)
    worker, outcome = in_thread(lambda: (ref.ask("late", block=False), ref.ask(_ActorStop(), block=False)))
    worker.join(10)
    [(_, (late, stop))] = outcome
    stop_deferred(ref)
    clock.advance(0)  # the actor stops before the worker's mail reaches the reactor thread
    clock.run_thread_call()
    clock.run_thread_call()
    failure_of(late.to_deferred()).trap(ActorDeadError)
    assert stop.get() is None


def test_a_base_exception_in_a_handler_stops_all_actors_without_blocking(clock: ReactorClock) -> None:
    journal: list[Any] = []
    a = Probe.start(journal, "a")
    b = Probe.start(journal, "b")
    c = Probe.start(journal, "c")
    clock.advance(0)
    del journal[:]

    def halt(actor: Probe) -> None:
        raise Halt()

    asked = ask_deferred(b, halt)
    clock.advance(0)  # a blocking stop_all() here would raise RuntimeError (or deadlock) instead
    assert journal == [("b", "stop"), ("c", "stop"), ("a", "stop")]
    assert not any(ref.is_alive() for ref in (a, b, c))
    assert reactor_actors() == []
    # Pykka leaves this ask unanswered forever; on the reactor that would be a Deferred that never fires.
    failure = failure_of(asked)
    failure.trap(ActorDeadError)
    assert isinstance(failure.value.__cause__, Halt)


def test_is_alive_tell_and_ask_work_with_the_lean_stopped_flag(clock: ReactorClock) -> None:
    ref = Probe.start()
    assert type(ref.actor_stopped).__name__ == "_StoppedFlag"
    assert ref.is_alive()
    ref.tell("told")
    asked = ask_deferred(ref, "asked")
    clock.advance(0)
    assert result_of(asked) == "asked"
    stop_deferred(ref)
    clock.advance(0)
    assert not ref.is_alive()
    assert ref.actor_stopped.wait(0) is True


def test_waiting_for_the_stopped_flag_raises_on_the_reactor_thread_and_blocks_elsewhere(
    clock: ReactorClock,
) -> None:
    ref = Probe.start()
    with pytest.raises(RuntimeError, match="block the reactor"):
        ref.actor_stopped.wait(0)
    worker, outcome = in_thread(lambda: ref.actor_stopped.wait(10))
    stop_deferred(ref)
    clock.advance(0)
    worker.join(10)
    assert outcome == [("ok", True)]


def test_mail_from_another_thread_needs_a_reactor_with_call_from_thread(isolated_registry: RefTable) -> None:
    plain = task.Clock()
    set_dispatcher(Dispatcher(plain))
    try:
        ref = Probe.start()
        worker, outcome = in_thread(lambda: ref.tell("from a thread"))
        worker.join(10)
        [(kind, exc)] = outcome
        assert kind == "error"
        assert isinstance(exc, RuntimeError)
        d = stop_deferred(ref)
        plain.advance(0)
        assert result_of(d) is True
        assert plain.getDelayedCalls() == []
    finally:
        set_dispatcher(None)


def test_a_stopped_actor_is_released_even_while_refs_to_it_remain(clock: ReactorClock) -> None:
    ref = Probe.start()
    clock.advance(0)
    stop_deferred(ref)
    clock.advance(0)
    gc.collect()
    assert ref._actor_weakref() is None


@pytest_twisted.ensureDeferred
async def test_a_blocking_ask_from_a_worker_thread_is_answered_by_the_running_reactor(
    isolated_registry: RefTable,
) -> None:
    from twisted.internet import reactor, threads

    set_dispatcher(Dispatcher(reactor))
    try:
        ref = await threads.deferToThread(Probe.start)  # starting from a thread hops to the reactor too
        assert await ref.ask("from the reactor", block=False) == "from the reactor"
        assert await threads.deferToThread(ref.ask, "from a thread", timeout=10) == "from a thread"
        assert await stop_deferred(ref) is True
    finally:
        set_dispatcher(None)


# --- registry -------------------------------------------------------------------------------------------------------


def test_install_fast_registry_keeps_the_refs_already_registered_and_is_idempotent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refs = [Probe().actor_ref for _ in range(3)]
    monkeypatch.setattr(ActorRegistry, "_actor_refs", list(refs))
    install_fast_registry()
    table = ActorRegistry._actor_refs
    assert isinstance(table, RefTable)
    assert table[:] == refs
    install_fast_registry()
    assert ActorRegistry._actor_refs is table


def test_importing_the_runtime_patches_nothing_and_a_device_directory_installs_the_ref_table() -> None:
    import subprocess
    import sys

    script = (
        "from pykka import ActorRegistry\n"
        "import nanoiot.actors.runtime, nanoiot.service\n"
        "before = type(ActorRegistry._actor_refs).__name__\n"
        "from twisted.internet.task import Clock\n"
        "from nanoiot.actors.device import ActorSettings\n"
        "from nanoiot.actors.directory import DeviceDirectory\n"
        "from nanoiot.rpc.queue import QueueSettings\n"
        "DeviceDirectory(Clock(), ActorSettings(queue=QueueSettings()))\n"
        "print(before, type(ActorRegistry._actor_refs).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["list", "RefTable"]


def test_ref_table_behaves_like_the_list_pykka_uses() -> None:
    a, b, c = (Probe().actor_ref for _ in range(3))
    table = RefTable([a, b])
    table.append(c)
    assert len(table) == 3
    assert b in table
    assert list(table) == [a, b, c]
    assert table[:] == [a, b, c]
    assert table[0] is a
    assert table[-1] is c
    assert list(reversed(table)) == [c, b, a]
    table.remove(b)
    assert b not in table
    assert table[:] == [a, c]
    with pytest.raises(ValueError):
        table.remove(b)
    table.clear()
    assert not table


def test_register_unregister_get_all_and_get_by_urn_work_with_the_fast_registry(clock: ReactorClock) -> None:
    first = Probe.start()
    second = Probe.start()
    assert ActorRegistry.get_all() == [first, second]
    assert ActorRegistry.get_by_urn(second.actor_urn) is second
    assert ActorRegistry.get_by_urn("urn:uuid:nobody") is None
    assert ActorRegistry.get_by_class(Probe) == [first, second]
    ActorRegistry.unregister(first)
    ActorRegistry.unregister(first)  # unknown refs are ignored, as with the list
    assert ActorRegistry.get_all() == [second]
    ActorRegistry.register(first)
    assert ActorRegistry.get_all() == [second, first]


def test_registry_stop_all_without_blocking_stops_actors_last_started_first(clock: ReactorClock) -> None:
    journal: list[Any] = []
    for name in "abcd":
        Probe.start(journal, name)
    clock.advance(0)
    del journal[:]
    futures = ActorRegistry.stop_all(block=False)
    clock.advance(0)
    assert journal == [("d", "stop"), ("c", "stop"), ("b", "stop"), ("a", "stop")]
    assert [f.get() for f in futures] == [True] * 4
    assert ActorRegistry.get_all() == []


def test_stop_all_deferred_stops_every_reactor_actor_last_started_first(clock: ReactorClock) -> None:
    journal: list[Any] = []
    for name in "abc":
        Probe.start(journal, name)
    clock.advance(0)
    del journal[:]
    d = stop_all_deferred()
    clock.advance(0)
    assert result_of(d) == [True, True, True]
    assert journal == [("c", "stop"), ("b", "stop"), ("a", "stop")]
    assert reactor_actors() == []


def test_ten_thousand_actors_start_and_stop_and_leave_the_registry_empty(clock: ReactorClock) -> None:
    journal: list[Any] = []
    refs = [Probe.start(journal) for _ in range(10_000)]
    clock.advance(0)
    assert len(journal) == 10_000
    assert len(ActorRegistry.get_all()) == 10_000
    d = stop_all_deferred()
    clock.advance(0)
    assert result_of(d) == [True] * 10_000
    assert not any(ref.is_alive() for ref in refs)
    assert ActorRegistry.get_all() == []
    assert clock.getDelayedCalls() == []
