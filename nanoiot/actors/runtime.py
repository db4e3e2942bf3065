"""The reactor <-> actor boundary: Pykka actors whose messages run on the Twisted reactor thread.

This is the only module that knows how Pykka actors are scheduled. Everything else talks to actors through
``ActorRef.tell``/``ask(block=False)``, :func:`ask_deferred`, :func:`stop_deferred` and ``await`` on the futures.

Why (from the actor-runtime study, "Pykka 4.x actors on a Twisted reactor", sections 2-6): a thread per device
(``pykka.ThreadingActor``) fails at ~22k actors and costs ~22 KB each; running every actor on the reactor thread
costs ~0.6 KB per idle actor, keeps each actor strictly sequential and makes a round trip a few microseconds.

How it works:

* :class:`Dispatcher` owns ONE run-queue of actors that have mail. A single ``callLater(0, drain)`` works through
  it, actor by actor, at most ``batch`` messages per actor per slot (fairness) and until the per-turn ``budget``
  is spent, then yields to the reactor with another ``callLater(0)``.
* :class:`ReactorActor` implements Pykka's three runtime hooks. Its inbox schedules the actor on the dispatcher
  (directly on the reactor thread, through ``callFromThread`` from other threads) and it replaces Pykka's blocking
  ``_actor_loop`` with a per-message step that keeps ``Actor._actor_loop_running``'s semantics.
* :class:`ReactorFuture` is completed on the reactor thread only and turns into a Deferred without blocking.
* A ``tell`` on the reactor thread (the hot path: every device report and command) queues the bare message: no
  ``Envelope`` (nothing is answered); the inbox hands Pykka an ``Envelope`` only when it asks for one (``get``, at
  teardown and passivation). Asks and mail from other threads are queued as Envelopes, as in Pykka.

Rules for code running on the reactor thread (they fail fast here instead of deadlocking):

* never ``ask(block=True)``, ``future.get()`` before completion, ``ref.stop()`` (blocking form),
  ``ActorRegistry.stop_all()`` (blocking form) or ``pykka.get_all()``: these raise ``RuntimeError``;
* use ``await ref.ask(msg, block=False)``, ``future.to_deferred()``, :func:`ask_deferred`, :func:`stop_deferred`,
  :func:`stop_all_deferred`, and ``gatherResults([f.to_deferred() for f in futures])`` instead of ``get_all``.

Handlers (``on_receive`` and proxied methods) run synchronously on the reactor thread, so they must not block.
A handler may return a ``Deferred``: the ask's future is then completed when the Deferred fires (with its result
or failure), and the actor goes on with its next messages meanwhile -- the mailbox is NOT held. A Deferred
returned for a ``tell`` that fails is treated like an exception raised by a tell (``on_failure``, actor stops)
while the actor is alive. Coroutines are not run for you: return ``ensureDeferred(coro)`` if you need one.
Stopping an actor does not cancel Deferreds it returned earlier: their asks are answered when they fire.

One deliberate difference from Pykka: when a handler raises a ``BaseException`` (Pykka then stops every actor,
here with ``stop_all(block=False)``), an ask being handled gets ``ActorDeadError`` (its ``__cause__`` is the
exception) instead of never being answered.

This module relies on Pykka private names (``Envelope``, ``_handle_receive``, ``_handle_failure``, ``_stop``,
``_actor_loop_setup``, ``_actor_loop_teardown``, ``messages._ActorStop``, ``ActorRegistry._actor_refs``,
``_future._Unset``, and what ``Actor.__init__``/``Future.__init__`` set); hence
``pykka>=4.5,<4.6`` in setup.cfg and the pinning tests in ``tests/unit/test_actor_runtime.py``.
"""

from __future__ import annotations

import functools
import itertools
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import pykka
from pykka import ActorDeadError, ActorRef, ActorRegistry, Timeout
from pykka._envelope import Envelope
from pykka._future import _Unset
from pykka.messages import _ActorStop
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python import threadable
from twisted.python.failure import Failure

from nanoiot.ids import uuid4

if TYPE_CHECKING:
    from pykka._types import OptExcInfo

__all__ = [
    "Dispatcher",
    "ReactorActor",
    "ReactorFuture",
    "RefTable",
    "ask_deferred",
    "get_dispatcher",
    "install_fast_registry",
    "reactor_dispatcher",
    "set_dispatcher",
    "stop_all_deferred",
    "stop_deferred",
]

T = TypeVar("T")
M = TypeVar("M")

log = Logger(namespace="nanoiot.actors.runtime")

#: Guards lazy creation of the rare ``threading.Event`` that a non-reactor thread blocks on.
_EVENT_LOCK = threading.Lock()

_Result = tuple[Any, "OptExcInfo | None"]  # (value, None) or (None, exc_info)


# --- dispatcher -----------------------------------------------------------------------------------------------------


class Dispatcher:
    """One run-queue of actors with mail, drained by ``callLater(0)`` turns bounded by a time budget.

    One shared queue (instead of a ``callLater`` per actor or per message) keeps the reactor's timed-call heap
    small and makes the budget global: a burst of mail stalls networking for at most ~``budget`` per turn.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        budget: float = 0.005,
        timer: Callable[[], float] = time.perf_counter,
        *,
        reactor_thread: int | None = None,
        batch: int = 64,
    ) -> None:
        """``reactor`` needs ``callLater`` (and ``callFromThread`` for mail from other threads).

        ``reactor_thread`` is the ident of the thread running the reactor; default: the calling thread.
        ``batch`` is the most messages one actor handles per scheduling slot before the next actor's turn.
        """
        if budget < 0:
            raise ValueError(f"budget must be >= 0, not {budget!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch!r}")
        self.reactor = reactor
        self.budget = budget
        self.batch = batch
        self._timer = timer
        self._thread = threading.get_ident() if reactor_thread is None else reactor_thread
        self._call_from_thread: Callable[..., Any] | None = getattr(reactor, "callFromThread", None)
        self._queue: deque[_Mailbox] = deque()
        self._delayed: Any = None  # the pending IDelayedCall of the next drain, if any
        self._draining = False

    def __repr__(self) -> str:
        return f"<Dispatcher budget={self.budget} batch={self.batch} pending={len(self._queue)}>"

    @property
    def pending(self) -> int:
        """Number of actors waiting in the run-queue (a cheap backlog gauge)."""
        return len(self._queue)

    def in_reactor_thread(self) -> bool:
        """True on the thread that runs this dispatcher's reactor: the only thread that may touch actor state."""
        return threading.get_ident() == self._thread

    def call_from_thread(self, f: Callable[..., object], *args: object) -> None:
        """Hand ``f(*args)`` to the reactor thread; fails loudly when the reactor cannot take calls from threads."""
        call = self._call_from_thread
        if call is None:
            raise RuntimeError(
                f"{self.reactor!r} has no callFromThread: actors on this dispatcher can only be used from the "
                "reactor thread"
            )
        call(f, *args)

    def call_in_reactor(self, f: Callable[..., object], *args: object) -> None:
        """Run ``f(*args)`` now on the reactor thread, or hop there from any other thread."""
        if threading.get_ident() == self._thread:
            f(*args)
        else:
            self.call_from_thread(f, *args)

    def _adopt_current_thread(self) -> None:
        """Called on the reactor thread at reactor start-up (default dispatcher only)."""
        self._thread = threading.get_ident()

    def _enqueue(self, box: _Mailbox) -> None:
        """Reactor thread only: queue an actor that has work and make sure a drain is coming."""
        self._queue.append(box)
        if self._delayed is None and not self._draining:
            self._delayed = self.reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        """One reactor turn of actor work: actor by actor until the queue is empty or the budget is spent."""
        self._delayed = None
        self._draining = True
        run_queue = self._queue
        timer = self._timer
        batch = self.batch
        deadline = timer() + self.budget
        try:
            while run_queue:
                box = run_queue.popleft()
                try:
                    more = box._run(batch, timer, deadline)
                except Exception:  # a bug in this module or in Pykka's own error handling: keep the others going
                    log.failure("ReactorActor runtime error while running {actor}", actor=box.actor)
                    box._scheduled = False
                    more = False
                if more:
                    run_queue.append(box)
                if timer() >= deadline:
                    break
        finally:
            self._draining = False
            if run_queue and self._delayed is None:
                self._delayed = self.reactor.callLater(0, self._drain)


_default_dispatcher: Dispatcher | None = None
_default_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher; created on first use on ``twisted.internet.reactor`` (imported lazily so that
    importing this module never installs a reactor)."""
    global _default_dispatcher
    dispatcher = _default_dispatcher
    if dispatcher is None:
        with _default_lock:
            if _default_dispatcher is None:
                from twisted.internet import reactor

                io_thread = threadable.ioThread  # set once a reactor has run
                _default_dispatcher = Dispatcher(cast(IReactorTime, reactor), reactor_thread=io_thread)
                if io_thread is None:
                    # Created before reactor.run(): follow the reactor to whichever thread ends up running it.
                    reactor.callWhenRunning(_default_dispatcher._adopt_current_thread)  # type: ignore[attr-defined]
            dispatcher = _default_dispatcher
    return dispatcher


def reactor_dispatcher(reactor: Any) -> Dispatcher:
    """A dispatcher of its own for a service running on ``reactor`` (passed to the actors it builds), following
    the reactor to whichever thread runs it."""
    io_thread = threadable.ioThread  # set once a reactor has run
    dispatcher = Dispatcher(cast(IReactorTime, reactor), reactor_thread=io_thread)
    if io_thread is None and hasattr(reactor, "callWhenRunning"):
        reactor.callWhenRunning(dispatcher._adopt_current_thread)
    return dispatcher


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Install the process-wide dispatcher (tests install one on a ``task.Clock``); ``None`` resets to lazy."""
    global _default_dispatcher
    with _default_lock:
        _default_dispatcher = dispatcher


# --- futures --------------------------------------------------------------------------------------------------------


def _exc_value(exc_info: OptExcInfo) -> BaseException:
    exc_type, exc_value, _ = exc_info
    if exc_value is None:
        assert exc_type is not None
        exc_value = exc_type()
    return exc_value


def _failure_from(exc_info: OptExcInfo) -> Failure:
    return Failure(_exc_value(exc_info), exc_info[0], exc_info[2])


def _exc_info_from(failure: Failure) -> OptExcInfo:
    return (failure.type, failure.value, failure.getTracebackObject())


class ReactorFuture(pykka.Future[T]):
    """A Pykka future that is completed on the reactor thread and becomes a Deferred without blocking.

    Created for every ask, so it is small: one instance attribute until someone waits on it; the Deferreds and
    the ``threading.Event`` that waiters need are created only when somebody waits.

    * ``set``/``set_exception`` on the reactor thread complete it at once; from another thread they hop to the
      reactor with ``callFromThread`` (the caller does not wait), so all completions happen on the reactor.
    * ``get()``: returns/raises when complete; on the reactor thread before completion it raises ``RuntimeError``
      (blocking there would deadlock the actor that must complete it); other threads block, with ``timeout``.
    * ``map``/``filter``/``reduce``/``join`` are non-blocking: they return futures completed via Deferreds.
    * Setting twice raises ``queue.Full``, like ``pykka.ThreadingFuture`` since Pykka 4.3.
    """

    # Class-level defaults instead of Future.__init__'s per-instance attributes: keeps an idle future ~1 dict slot.
    _get_hook = None
    _get_hook_result: Any = _Unset()
    _dispatcher: Dispatcher | None = None
    _result: _Result | None = None
    _waiters: list[Deferred[Any]] | None = None
    _event: threading.Event | None = None

    def __init__(self, dispatcher: Dispatcher | None = None) -> None:
        """``dispatcher`` tells the future which thread is the reactor's; ``None`` means :func:`get_dispatcher`."""
        # Future.__init__ is deliberately not called: it only sets _get_hook/_get_hook_result (class defaults here).
        if dispatcher is not None:
            self._dispatcher = dispatcher

    def __repr__(self) -> str:
        return f"<ReactorFuture {'done' if self.done() else 'pending'}>"

    def _get_dispatcher(self) -> Dispatcher:
        return self._dispatcher or get_dispatcher()

    def done(self) -> bool:
        """True once a value or an exception has been set (or a get hook installed)."""
        return self._result is not None or self._get_hook is not None

    def get(self, *, timeout: float | None = None) -> T:
        """The value (or raise the exception); never blocks the reactor thread (raises ``RuntimeError`` there)."""
        if self._get_hook is not None:
            return super().get(timeout=timeout)
        result = self._result
        if result is None:
            result = self._wait(timeout)
        value, exc_info = result
        if exc_info is not None:
            exc_value = _exc_value(exc_info)
            raise exc_value.with_traceback(exc_info[2])
        return cast(T, value)

    def _wait(self, timeout: float | None) -> _Result:
        if self._get_dispatcher().in_reactor_thread():
            raise RuntimeError(
                "ReactorFuture.get() before completion would block the reactor: "
                "use `await future` or future.to_deferred() on the reactor thread"
            )
        event = self._event
        if event is None:
            with _EVENT_LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        # The reactor writes _result before reading _event; we wrote _event before reading _result: one of the
        # two sides always sees the other's write, so no wake-up is lost.
        result = self._result
        if result is None:
            if not event.wait(timeout):
                raise Timeout(f"{timeout} seconds")
            result = self._result
            assert result is not None
        return result

    def set(self, value: T | None = None) -> None:
        """Complete with ``value`` (on the reactor thread; hops there from other threads)."""
        self._settle((value, None))

    def set_exception(self, exc_info: OptExcInfo | None = None) -> None:
        """Complete with an exception; without arguments, the one being handled (``sys.exc_info()``)."""
        if exc_info is None:
            exc_info = sys.exc_info()
        assert len(exc_info) == 3
        self._settle((None, exc_info))

    def set_get_hook(self, func: Callable[[float | None], T]) -> None:
        """Pykka's lazy get hook (``ActorRef.stop`` uses it); refused once a result is set."""
        if self._result is not None:
            raise queue.Full
        super().set_get_hook(func)

    def _settle(self, result: _Result) -> None:
        if self._result is not None or self._get_hook is not None:
            raise queue.Full
        dispatcher = self._get_dispatcher()
        if dispatcher.in_reactor_thread():
            self._complete(result)
        else:
            dispatcher.call_from_thread(self._complete, result)

    def _complete(self, result: _Result) -> None:
        """Reactor thread only."""
        if self._result is not None or self._get_hook is not None:
            raise queue.Full
        self._result = result
        event = self._event
        if event is not None:
            event.set()
        waiters = self._waiters
        if waiters:
            self._waiters = None
            value, exc_info = result
            for d in waiters:
                if exc_info is None:
                    d.callback(value)
                else:
                    d.errback(_failure_from(exc_info))

    def _forget_waiter(self, d: Deferred[Any]) -> None:
        """Canceller of ``to_deferred()`` Deferreds: a caller that gave up (e.g. ``addTimeout``) is dropped."""
        waiters = self._waiters
        if waiters is not None and d in waiters:
            waiters.remove(d)

    def to_deferred(self) -> Deferred[T]:
        """A new Deferred that fires with the value or errbacks with the exception; never blocks.

        Call it on the reactor thread (other threads may only call it once the future is done). A future built by
        Pykka with a get hook (e.g. ``ActorRef.stop(block=False)``) is evaluated right now, synchronously; use
        :func:`stop_deferred` instead of ``ref.stop(block=False).to_deferred()``.
        """
        if self._get_hook is not None:
            try:
                return succeed(self.get())
            except Exception:
                return fail()
        result = self._result
        if result is not None:
            value, exc_info = result
            return succeed(value) if exc_info is None else fail(_failure_from(exc_info))
        if not self._get_dispatcher().in_reactor_thread():
            raise RuntimeError("ReactorFuture.to_deferred() on a pending future must be called on the reactor thread")
        d: Deferred[T] = Deferred(self._forget_waiter)
        waiters = self._waiters
        if waiters is None:
            self._waiters = [d]
        else:
            waiters.append(d)
        return d

    def __await__(self) -> Generator[Any, Any, T]:
        """``await future`` inside ``ensureDeferred`` coroutines; Pykka's own ``__await__`` would block."""
        return self.to_deferred().__await__()

    __iter__ = __await__  # type: ignore[assignment]  # same aliasing as pykka.Future

    # Pykka's combinators block in get(); these complete a new future from Deferreds instead.

    def _derive(self, d: Deferred[Any]) -> ReactorFuture[Any]:
        out: ReactorFuture[Any] = ReactorFuture(self._dispatcher)

        def on_value(value: Any) -> None:
            out._settle((value, None))

        def on_failure(failure: Failure) -> None:
            out._settle((None, _exc_info_from(failure)))

        d.addCallbacks(on_value, on_failure)
        return out

    def map(self, func: Callable[[T], M]) -> ReactorFuture[M]:  # type: ignore[override]
        """Non-blocking: a future of ``func(value)``; exceptions (ours or ``func``'s) propagate to it."""
        return self._derive(self.to_deferred().addCallback(func))

    def filter(self, func: Callable[[Any], bool]) -> ReactorFuture[Any]:  # type: ignore[override]
        """Non-blocking: a future of the list of items of the (iterable) value for which ``func`` is true."""
        return self._derive(self.to_deferred().addCallback(lambda value: list(filter(func, value))))

    def reduce(self, func: Callable[[Any, Any], Any], *args: Any) -> ReactorFuture[Any]:  # type: ignore[override]
        """Non-blocking: ``functools.reduce(func, value, *args)`` as a future."""
        return self._derive(self.to_deferred().addCallback(lambda value: functools.reduce(func, value, *args)))

    def join(self, *futures: pykka.Future[Any]) -> ReactorFuture[Any]:  # type: ignore[override]
        """Non-blocking: a future of the list of all values, or of the first exception."""
        ds = [self.to_deferred(), *(_future_to_deferred(f) for f in futures)]

        def first_error(failure: Failure) -> Failure:
            if failure.check(FirstError):
                return cast(FirstError, failure.value).subFailure
            return failure

        return self._derive(gatherResults(ds, consumeErrors=True).addErrback(first_error))


def _future_to_deferred(future: pykka.Future[Any]) -> Deferred[Any]:
    """Deferred for any Pykka future: ours directly; others (threads) through a reactor pool thread."""
    if isinstance(future, ReactorFuture):
        return future.to_deferred()
    from twisted.internet import threads

    return threads.deferToThread(future.get)


# --- the actor ------------------------------------------------------------------------------------------------------

_NEW, _STARTING, _RUNNING, _DEAD = range(4)


class _StoppedFlag:
    """Replaces the per-actor ``threading.Event`` (~1.2 KB) as ``actor_stopped``: ``is_set``/``set``/``wait``.

    Set on the reactor thread only. ``wait()`` on the reactor thread before it is set raises ``RuntimeError``
    (nothing could set it while we block); other threads get a ``threading.Event`` created on demand.
    """

    __slots__ = ("_dispatcher", "_event", "_set")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._set = False
        self._event: threading.Event | None = None

    def __repr__(self) -> str:
        return f"<StoppedFlag set={self._set}>"

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._dispatcher.in_reactor_thread():
            raise RuntimeError("waiting for an actor to stop would block the reactor: use stop_deferred()")
        event = self._event
        if event is None:
            with _EVENT_LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self._set:
            return True
        return event.wait(timeout)


_get_ident = threading.get_ident


def _actor_failed(actor: ReactorActor) -> None:
    """A told message raised (called in its ``except``): Pykka's logging and the actor's ``on_failure``."""
    actor._handle_failure(*sys.exc_info())
    try:
        actor.on_failure(*sys.exc_info())
    except Exception:  # noqa: BLE001
        actor._handle_failure(*sys.exc_info())


def _reject(envelope: Any) -> None:
    """Answer mail (an Envelope, or a told message) that reached an actor after it stopped, like Pykka's teardown."""
    if type(envelope) is not Envelope:
        log.debug("dropped {kind} sent to a stopped actor", kind=type(envelope).__name__)
        return
    reply_to = envelope.reply_to
    if reply_to is None:
        log.debug("dropped {kind} sent to a stopped actor", kind=type(envelope.message).__name__)
    elif isinstance(envelope.message, _ActorStop):
        reply_to.set(None)
    else:
        reply_to.set_exception(
            exc_info=(ActorDeadError, ActorDeadError("actor stopped before handling the message"), None)
        )


class _Mailbox:
    """The actor's inbox (Pykka's ``ActorInbox``: put/get/empty) and its scheduling state on the dispatcher.

    The message deque exists only while there is mail: an empty ``deque`` costs ~600 bytes, an idle actor nothing.
    It holds Envelopes (asks, mail from other threads) and bare told messages (:meth:`tell` on the reactor thread);
    :meth:`get` always gives an Envelope, as Pykka expects.
    """

    __slots__ = ("_mail", "_scheduled", "_state", "actor", "dispatcher")

    def __init__(self, actor: ReactorActor, dispatcher: Dispatcher) -> None:
        self.actor: ReactorActor | None = actor  # dropped after teardown so stale refs do not keep the actor
        self.dispatcher = dispatcher
        self._mail: deque[Any] | None = None  # Envelopes and bare told messages
        self._state = _NEW
        self._scheduled = False

    def __repr__(self) -> str:
        return f"<Mailbox of {self.actor} state={self._state} mail={len(self._mail or ())}>"

    # ActorInbox protocol ------------------------------------------------------------------------------------------

    def put(self, envelope: Envelope[Any], /) -> None:
        dispatcher = self.dispatcher
        if dispatcher.in_reactor_thread():
            self._deliver(envelope)
        else:
            dispatcher.call_from_thread(self._deliver, envelope)

    def get(self) -> Envelope[Any]:
        mail = self._mail
        if not mail:
            raise RuntimeError("ReactorActor inbox is empty: get() would block the reactor")
        item = mail.popleft()
        return item if type(item) is Envelope else Envelope(item)

    def tell(self, message: Any, /) -> None:
        """A message nobody answers: queued bare on the reactor thread (as an Envelope from other threads)."""
        dispatcher = self.dispatcher
        if _get_ident() == dispatcher._thread:
            self._deliver(message)
        else:
            dispatcher.call_from_thread(self._deliver, Envelope(message))

    def empty(self) -> bool:
        return not self._mail

    # scheduling ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.dispatcher.call_in_reactor(self._start_local)

    def _start_local(self) -> None:
        if self._state == _NEW:
            self._state = _STARTING
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.dispatcher._enqueue(self)

    def _deliver(self, envelope: Any) -> None:
        """Reactor thread only; ``envelope``: an Envelope or a bare told message."""
        state = self._state
        if state == _DEAD:  # only mail that hopped from another thread can get here
            _reject(envelope)
            return
        mail = self._mail
        if mail is None:
            mail = self._mail = deque()
        mail.append(envelope)
        if state != _NEW and not self._scheduled:  # mail sent before start() waits for on_start
            self._scheduled = True
            self.dispatcher._enqueue(self)

    def _run(self, limit: int, timer: Callable[[], float], deadline: float) -> bool:
        """One scheduling slot: on_start if due, then up to ``limit`` messages. True: re-queue me."""
        actor = self.actor
        if actor is None:
            self._scheduled = False
            return False
        stopped = actor.actor_stopped
        if self._state == _STARTING:
            self._state = _RUNNING
            try:
                actor._actor_loop_setup()
            except BaseException as exc:  # noqa: BLE001 - Pykka's setup only catches Exception
                self._stop_everything(actor, exc, None)
        mail = self._mail
        if mail:
            handle, handle_tell = self._handle, self._handle_tell
            count = 0
            while mail and not stopped._set:
                item = mail.popleft()
                if type(item) is Envelope:
                    handle(actor, item)
                else:
                    handle_tell(actor, item)
                count += 1
                # No clock read after the last message: the dispatcher reads it after every slot anyway.
                if count >= limit or (mail and timer() >= deadline):
                    break
        if stopped.is_set():
            self._teardown()
            return False
        if self._mail:
            return True
        self._mail = None
        self._scheduled = False
        return False

    def _teardown(self) -> None:
        actor = self.actor
        if actor is None:
            return
        actor._actor_loop_teardown()  # answers queued asks (ActorDeadError / None for stops), drops tells
        self._state = _DEAD
        self._scheduled = False
        self._mail = None
        self.actor = None

    # one message: Actor._actor_loop_running's body ----------------------------------------------------------------

    def _handle(self, actor: ReactorActor, envelope: Envelope[Any]) -> None:
        reply_to = envelope.reply_to
        try:
            response = actor._handle_receive(envelope.message)
            if response is not None and isinstance(response, Deferred):  # see _handle_tell
                self._settle_later(actor, response, reply_to)
            elif reply_to is not None:
                reply_to.set(response)
        except Exception:
            if reply_to is not None:
                log.failure("Exception returned from {actor} to caller", level=LogLevel.info, actor=actor)
                reply_to.set_exception()
            else:
                _actor_failed(actor)
        except BaseException as exc:  # noqa: BLE001
            self._stop_everything(actor, exc, reply_to)

    def _handle_tell(self, actor: ReactorActor, message: Any) -> None:
        """``_handle`` for a bare told message (no reply address)."""
        try:
            if actor._plain_receive and not isinstance(message, tuple):
                # Pykka's own messages (stop, proxy calls) are NamedTuples; anything else is what its
                # _handle_receive passes on to on_receive after four isinstance checks: skipped (every device message).
                response = actor.on_receive(message)
            else:
                response = actor._handle_receive(message)
            # Deferred's metaclass is ABCMeta: isinstance costs 0.1 us, and most handlers return None.
            if response is not None and isinstance(response, Deferred):
                response.addErrback(self._tell_failed, actor)
        except Exception:
            _actor_failed(actor)
        except BaseException as exc:  # noqa: BLE001
            self._stop_everything(actor, exc, None)

    def _stop_everything(self, actor: ReactorActor, exc: BaseException, reply_to: pykka.Future[Any] | None) -> None:
        """Pykka's BaseException rule (stop this actor, then all actors) without its blocking ``stop_all()``."""
        log.warn("{exception!r} in {actor}: stopping all actors", exception=exc, actor=actor)
        if not actor.actor_stopped.is_set():
            actor._stop()
        if reply_to is not None:
            # Pykka leaves this ask unanswered forever; a reactor caller would wait forever, so tell it.
            dead = ActorDeadError(f"{actor} stopped by {exc!r}")
            dead.__cause__ = exc
            try:
                reply_to.set_exception(exc_info=(ActorDeadError, dead, None))
            except queue.Full:
                pass
        ActorRegistry.stop_all(block=False)

    def _settle_later(self, actor: ReactorActor, d: Deferred[Any], reply_to: pykka.Future[Any] | None) -> None:
        """A handler returned a Deferred: answer when it fires; the mailbox moves on meanwhile."""
        if reply_to is not None:
            d.addCallbacks(_reply_value, _reply_failure, callbackArgs=(reply_to,), errbackArgs=(reply_to, actor))
        else:
            d.addErrback(self._tell_failed, actor)

    def _tell_failed(self, failure: Failure, actor: ReactorActor) -> None:
        """A tell's Deferred failed: the same as a tell raising (unless the actor is already gone)."""
        if actor.actor_stopped.is_set():
            log.failure(
                "Deferred returned by {actor} for a tell failed after it stopped", failure, level=LogLevel.error,
                actor=actor,
            )
            return
        exc_info = _exc_info_from(failure)
        actor._handle_failure(*exc_info)
        try:
            actor.on_failure(*exc_info)
        except Exception:  # noqa: BLE001
            actor._handle_failure(*sys.exc_info())
        # Safe even inside this actor's own slot (the Deferred may fire from its next handler): the slot then
        # finds the actor stopped and its inbox already drained.
        self._teardown()


def _reply_value(value: Any, reply_to: pykka.Future[Any]) -> None:
    reply_to.set(value)


def _reply_failure(failure: Failure, reply_to: pykka.Future[Any], actor: ReactorActor) -> None:
    log.failure("Exception returned from {actor} to caller", failure, level=LogLevel.info, actor=actor)
    reply_to.set_exception(_exc_info_from(failure))


class ReactorActor(pykka.Actor):
    """A Pykka actor whose messages are handled on the reactor thread, scheduled by a :class:`Dispatcher`.

    Semantics are Pykka's (``on_start`` first; ask errors go to the caller; tell errors call ``on_failure`` and
    stop the actor; queued asks of a stopped actor get ``ActorDeadError``), with the reactor rules described in the
    module docstring. Set the class attribute ``dispatcher`` to run a class on another dispatcher.
    """

    dispatcher: ClassVar[Dispatcher | None] = None
    """The dispatcher of this class's actors; ``None``: :func:`get_dispatcher` when an actor is created."""

    actor_stopped: _StoppedFlag  # type: ignore[assignment]  # duck-types threading.Event

    #: Whether a told message that is not one of Pykka's own may go straight to ``on_receive`` (False for a class
    #: that overrides Pykka's ``_handle_receive``).
    _plain_receive: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_receive = cls._handle_receive is pykka.Actor._handle_receive

    def __init__(self, *_args: Any, dispatcher: Dispatcher | None = None, **_kwargs: Any) -> None:
        """Pykka's ``Actor.__init__`` without its ``threading.Event`` (the largest per-actor object).

        Sets exactly the attributes ``Actor.__init__`` sets (pinned by a test), so subclasses call
        ``super().__init__()`` as usual; ``dispatcher`` (passed in by whoever builds the actors) wins over the
        class attribute and the process default.
        """
        self.actor_urn = _next_urn()
        inbox = _Mailbox(self, dispatcher) if dispatcher is not None else self._create_actor_inbox()
        self.actor_inbox = inbox
        self.actor_stopped = _StoppedFlag(inbox.dispatcher)
        self._actor_ref = _ReactorRef(self)

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> ActorRef[Any]:
        """Pykka's ``Actor.start`` (build, register, start the loop) without its two ``logger.debug`` lines, whose
        f-strings formatted the actor and its ref for every start, logged or not (a device actor is started per
        connecting device: a connect storm starts thousands a second)."""
        obj = cls(*args, **kwargs)
        ref = obj._actor_ref
        with ActorRegistry._actor_refs_lock:
            ActorRegistry._actor_refs.append(ref)
        obj._start_actor_loop()
        return ref

    def _create_actor_inbox(self) -> _Mailbox:  # type: ignore[override]  # Pykka calls self._create_actor_inbox()
        return _Mailbox(self, type(self).dispatcher or get_dispatcher())

    @classmethod
    def _create_future(cls) -> ReactorFuture[Any]:  # type: ignore[override]
        return ReactorFuture(cls.dispatcher or get_dispatcher())

    def _start_actor_loop(self) -> None:
        """Schedule ``on_start`` (then the mail) on the dispatcher; never blocks, never runs anything inline."""
        cast(_Mailbox, self.actor_inbox).start()


class _ReactorRef(ActorRef):  # type: ignore[type-arg]
    """Pykka's ``ActorRef`` whose ``tell`` queues the bare message (no Envelope: nobody is answered)."""

    def tell(self, message: Any) -> None:
        if self.actor_stopped._set:  # type: ignore[attr-defined]  # our _StoppedFlag
            raise ActorDeadError(f"{self} not found")
        self.actor_inbox.tell(message)  # type: ignore[attr-defined]  # our _Mailbox


#: Actor URNs: a random version-4 UUID per process whose last 48 bits count the actors started in it. Unique like
#: ``uuid4().urn`` (what Pykka uses) for a fraction of its cost: one string format per actor.
_URN_PREFIX = uuid4().urn[:-12]
_urn_numbers = itertools.count(1)


def _next_urn() -> str:
    return f"{_URN_PREFIX}{next(_urn_numbers) & 0xFFFFFFFFFFFF:012x}"


# --- non-blocking helpers -------------------------------------------------------------------------------------------


def ask_deferred(ref: ActorRef[Any], message: Any) -> Deferred[Any]:
    """``ref.ask(message, block=False)`` as a Deferred; a dead actor is a failed Deferred, never a raise."""
    try:
        future = ref.ask(message, block=False)
    except Exception:
        return fail()
    return _future_to_deferred(future)


def _stopped_result(failure: Failure) -> bool:
    failure.trap(ActorDeadError)
    return False


def stop_deferred(ref: ActorRef[Any]) -> Deferred[bool]:
    """Non-blocking ``ref.stop()``: True if this (or an earlier) stop request was accepted, False if already dead.

    The stop is a message: it is handled after the mail already queued, then ``on_stop`` runs.
    """
    d = ask_deferred(ref, _ActorStop())
    return d.addCallbacks(lambda _: True, _stopped_result)


def stop_all_deferred(dispatcher: Dispatcher | None = None) -> Deferred[list[bool]]:
    """Stop every registered ReactorActor (only those on ``dispatcher`` if given) without blocking.

    Stop requests are sent last-started first (like ``ActorRegistry.stop_all``); idle actors therefore stop in
    LIFO order, but an actor with a backlog stops after its backlog, so completion order is not guaranteed.
    """
    refs = [
        ref
        for ref in reversed(ActorRegistry.get_all())
        if issubclass(ref.actor_class, ReactorActor)
        and (dispatcher is None or cast(_Mailbox, ref.actor_inbox).dispatcher is dispatcher)
    ]
    if not refs:
        return succeed([])
    return gatherResults([stop_deferred(ref) for ref in refs], consumeErrors=True)


# --- registry at scale ----------------------------------------------------------------------------------------------


class RefTable:
    """Drop-in for ``ActorRegistry._actor_refs`` (a list) backed by an insertion-ordered dict.

    Pykka's list makes ``unregister`` O(N): stopping 100k actors last-first takes minutes. Keyed by the ref
    (``ActorRef`` hashes by identity), this makes register/unregister O(1) and keeps start order for iteration,
    ``reversed`` and slicing. ``get_by_urn``/``get_by_class`` remain linear scans in Pykka: keep your own dict
    for lookups. A ref is held at most once (Pykka never registers a ref twice).
    """

    __slots__ = ("_refs",)

    def __init__(self, refs: Iterable[ActorRef[Any]] = ()) -> None:
        self._refs: dict[ActorRef[Any], None] = dict.fromkeys(refs)

    def __repr__(self) -> str:
        return f"<RefTable of {len(self._refs)} refs>"

    def append(self, ref: ActorRef[Any]) -> None:
        self._refs[ref] = None

    def remove(self, ref: ActorRef[Any]) -> None:
        try:
            del self._refs[ref]
        except KeyError:
            raise ValueError("RefTable.remove(ref): ref not registered") from None

    def clear(self) -> None:
        self._refs.clear()

    def __contains__(self, ref: object) -> bool:
        return ref in self._refs

    def __iter__(self) -> Iterator[ActorRef[Any]]:
        return iter(self._refs)

    def __reversed__(self) -> Iterator[ActorRef[Any]]:
        return reversed(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, index: int | slice) -> Any:
        """``[:]`` is what ``get_all`` uses; any index or slice works (O(N), like copying)."""
        return list(self._refs)[index]


def install_fast_registry() -> None:
    """Swap ``ActorRegistry._actor_refs`` for a :class:`RefTable`, keeping refs already registered. Idempotent."""
    with ActorRegistry._actor_refs_lock:
        current = ActorRegistry._actor_refs
        if not isinstance(current, RefTable):
            ActorRegistry._actor_refs = RefTable(current)  # type: ignore[assignment]


