"""The CoAP message layer (RFC 7252 §4): message ids, duplicate detection, CON retransmission, ping.

Everything runs on the reactor thread against an injected clock (``IReactorTime``): no thread, no sleeping.

* **Dedup** is keyed by the ``(host, port, mid)`` tuple (coapthon concatenates them as text, so
  ``(h, 5683, 12)`` and ``(h, 56831, 2)`` collide: B2). A CON request's reply bytes are cached for
  EXCHANGE_LIFETIME and replayed byte for byte to a retransmission; a NON request is remembered for NON_LIFETIME
  and its duplicates are ignored (§4.5).
* **Piggy-backed or separate**: a CON request not answered within PIGGYBACK_TIMEOUT gets an empty ACK, and its
  answer then goes out as a separate CON response (§5.2.2).
* **CON retransmission** resends the *same bytes* (same MID, token, Observe number) at T, 2T, 4T, 8T after the
  previous send, T uniform in [ACK_TIMEOUT, ACK_TIMEOUT × ACK_RANDOM_FACTOR] (the random source is injected), and
  gives up 16T after the 4th retransmission: 62–93 s after the first send.
* **Ping** (an Empty CON) is answered with an RST (B5).
* **Message ids** are allocated per peer, starting at a random value, so that no peer sees one reused within
  EXCHANGE_LIFETIME before 65,536 messages *to that peer* (a server-wide counter would wrap much sooner).
* **Housekeeping**: every time-bounded table is an :class:`ExpiringMap`; one :class:`Sweeper` purges them all
  with a single lazily scheduled delayed call at the earliest deadline (none scheduled when nothing expires).
"""

from __future__ import annotations

import random as _random
from collections import deque
from typing import Any, Callable, Hashable

from coapthon.messages.message import Message
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nanoiot.transports.coap import codec

log = Logger(namespace="nanoiot.coap")

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
EXCHANGE_LIFETIME = 247.0
NON_LIFETIME = 145.0
#: How long a CON request may wait for its answer before it gets an empty ACK (ThingsBoard: piggyback_timeout).
PIGGYBACK_TIMEOUT = 0.5
#: Dedup entries kept at most (each holds a cached reply); past this the oldest go first.
MAX_EXCHANGES = 100_000

Address = tuple[str, int]


class _Entry:
    __slots__ = ("deadline", "value")

    def __init__(self, deadline: float, value: Any) -> None:
        self.deadline = deadline
        self.value = value


class ExpiringMap:
    """A dict whose entries live ``lifetime`` seconds after their last ``put``; bounded by ``max_size``.

    ``order`` holds (deadline, key, entry) in insertion order; since one map has one lifetime, that is also deadline
    order, so a purge only looks at its head. A refreshed or popped key leaves a stale record behind (its entry is no
    longer the one in the dict), skipped when it comes up and compacted away when stale records pile up.
    """

    def __init__(self, lifetime: float, max_size: int | None = None,
                 on_expire: Callable[[Hashable, Any], None] | None = None) -> None:
        self.lifetime = lifetime
        self.max_size = max_size
        self.on_expire = on_expire
        self.sweeper: Sweeper | None = None
        self._data: dict[Hashable, _Entry] = {}
        self._order: deque[tuple[float, Hashable, _Entry]] = deque()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable, now: float, default: Any = None) -> Any:
        entry = self._data.get(key)
        if entry is None or entry.deadline <= now:
            return default
        return entry.value

    def put(self, key: Hashable, value: Any, now: float) -> None:
        entry = _Entry(now + self.lifetime, value)
        self._data[key] = entry
        self._order.append((entry.deadline, key, entry))
        if self.max_size is not None:
            while len(self._data) > self.max_size and self._order:
                self._drop_head()
        if len(self._order) > 2 * len(self._data) + 64:
            self._compact()
        if self.sweeper is not None:
            self.sweeper.kick(entry.deadline)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        entry = self._data.pop(key, None)
        return default if entry is None else entry.value

    def values(self) -> list[Any]:
        return [entry.value for entry in self._data.values()]

    def clear(self) -> None:
        self._data.clear()
        self._order.clear()

    def next_deadline(self) -> float | None:
        while self._order:
            deadline, key, entry = self._order[0]
            if self._data.get(key) is entry:
                return deadline
            self._order.popleft()  # stale: refreshed or popped since
        return None

    def purge(self, now: float) -> None:
        while self._order and self._order[0][0] <= now:
            self._drop_head()

    def _drop_head(self) -> None:
        _, key, entry = self._order.popleft()
        if self._data.get(key) is not entry:
            return
        del self._data[key]
        if self.on_expire is not None:
            self.on_expire(key, entry.value)

    def _compact(self) -> None:
        data = self._data
        self._order = deque(record for record in self._order if data.get(record[1]) is record[2])


class Sweeper:
    """One delayed call, at the earliest deadline of its maps, that purges them all."""

    #: Purges are batched: an entry may outlive its deadline by this much (``get`` already ignores it).
    SLACK = 1.0

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.maps: list[ExpiringMap] = []
        self._call: IDelayedCall | None = None
        self._stopped = False

    def register(self, expiring: ExpiringMap) -> ExpiringMap:
        expiring.sweeper = self
        self.maps.append(expiring)
        deadline = expiring.next_deadline()
        if deadline is not None:
            self.kick(deadline)
        return expiring

    def kick(self, deadline: float) -> None:
        if self._stopped:
            return
        if self._call is not None and self._call.active() and self._call.getTime() <= deadline + self.SLACK:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        delay = max(0.0, deadline + self.SLACK - self.clock.seconds())
        self._call = self.clock.callLater(delay, self._sweep)

    def _sweep(self) -> None:
        self._call = None
        now = self.clock.seconds()
        for expiring in self.maps:
            expiring.purge(now)
        deadlines = [d for d in (m.next_deadline() for m in self.maps) if d is not None]
        if deadlines:
            self.kick(min(deadlines))

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class Outgoing:
    """A CON message we sent and retransmit until it is ACKed, RST or given up."""

    __slots__ = ("addr", "mid", "data", "timeout", "retransmits", "call", "on_ack", "on_reset", "on_timeout",
                 "sent_at")

    def __init__(self, addr: Address, mid: int, data: bytes, timeout: float,
                 on_ack: Callable[[Message], None] | None, on_reset: Callable[[], None] | None,
                 on_timeout: Callable[[], None] | None, sent_at: float) -> None:
        self.addr = addr
        self.mid = mid
        self.data = data
        self.timeout = timeout
        self.retransmits = 0
        self.call: IDelayedCall | None = None
        self.on_ack = on_ack
        self.on_reset = on_reset
        self.on_timeout = on_timeout
        self.sent_at = sent_at


class _Seen:
    """What we know about a request we received: its exchange while open, then the reply bytes to replay."""

    __slots__ = ("exchange", "reply")

    def __init__(self, exchange: Exchange | None) -> None:
        self.exchange = exchange
        self.reply: bytes | None = None


class Exchange:
    """One request received; the application answers it once with :meth:`respond`."""

    __slots__ = ("layer", "request", "addr", "seen", "acked", "responded", "_piggyback")

    def __init__(self, layer: MessageLayer, request: Message, addr: Address, seen: _Seen) -> None:
        self.layer = layer
        self.request = request
        self.addr = addr
        self.seen = seen
        #: An empty ACK went out: the answer will be a separate response.
        self.acked = False
        self.responded = False
        self._piggyback: IDelayedCall | None = None

    @property
    def confirmable(self) -> bool:
        return self.request.type == codec.CON

    def respond(self, response: Message) -> None:
        """Send the answer: piggy-backed on the ACK if still possible, else a separate CON (or NON for NON)."""
        if self.responded:
            return
        self.responded = True
        self._cancel_piggyback()
        self.seen.exchange = None
        response.token = self.request.token
        layer = self.layer
        if self.confirmable and not self.acked:
            response.type = codec.ACK
            response.mid = self.request.mid
            data = codec.encode(response)
            self.seen.reply = data
            layer.write(data, self.addr)
        elif self.confirmable:
            layer.send_con(response, self.addr)
        else:
            layer.send_non(response, self.addr)

    def ack_now(self) -> None:
        """Send the empty ACK at once (the answer will take a while, or a retransmission shows the peer waits)."""
        if self.acked or self.responded or not self.confirmable:
            return
        self.acked = True
        self._cancel_piggyback()
        data = codec.empty(codec.ACK, self.request.mid)
        self.seen.reply = data
        self.layer.write(data, self.addr)

    def start_piggyback_timer(self) -> None:
        if self.layer.stopped:
            return
        if self.confirmable and not self.responded and not self.acked and self._piggyback is None:
            self._piggyback = self.layer.clock.callLater(self.layer.piggyback_timeout, self._piggyback_expired)

    def _piggyback_expired(self) -> None:
        self._piggyback = None
        self.ack_now()

    def _cancel_piggyback(self) -> None:
        if self._piggyback is not None and self._piggyback.active():
            self._piggyback.cancel()
        self._piggyback = None


class MessageLayer:
    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[bytes, Address], None],
        random: Callable[[], float] = _random.random,
        sweeper: Sweeper | None = None,
        max_exchanges: int = MAX_EXCHANGES,
        piggyback_timeout: float = PIGGYBACK_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.write = write
        self.random = random
        self.piggyback_timeout = piggyback_timeout
        self.sweeper = sweeper or Sweeper(clock)
        #: (host, port, mid) -> _Seen, for CON and NON requests received.
        self.con_seen = self.sweeper.register(ExpiringMap(EXCHANGE_LIFETIME, max_exchanges))
        self.non_seen = self.sweeper.register(ExpiringMap(NON_LIFETIME, max_exchanges))
        #: (addr, mid) -> Outgoing, for CON messages we retransmit.
        self.outgoing: dict[tuple[Address, int], Outgoing] = {}
        #: (addr, mid) -> on_reset callback, for NON messages a peer may still reject.
        self.non_sent = self.sweeper.register(ExpiringMap(NON_LIFETIME, max_exchanges))
        #: addr -> the next message id for that peer.
        self.mids = self.sweeper.register(ExpiringMap(EXCHANGE_LIFETIME, max_exchanges))
        self.stopped = False

    # --- message ids ----------------------------------------------------------------------------------------------

    def next_mid(self, addr: Address) -> int:
        now = self.clock.seconds()
        mid = self.mids.get(addr, now)
        if mid is None:
            mid = int(self.random() * 65536) & 0xFFFF
        for _ in range(65536):
            if (addr, mid) not in self.outgoing:
                break
            mid = (mid + 1) & 0xFFFF
        self.mids.put(addr, (mid + 1) & 0xFFFF, now)
        return mid

    # --- inbound --------------------------------------------------------------------------------------------------

    def receive(self, message: Message, addr: Address) -> Exchange | None:
        """Handle the message-layer part of one decoded message; returns a new request for the application."""
        mtype = message.type
        message_code = message.code or codec.EMPTY
        mid = message.mid
        if message_code == codec.EMPTY:
            if mtype == codec.CON:  # CoAP ping
                self.write(codec.empty(codec.RST, mid), addr)
            elif mtype == codec.ACK:
                self._acked(addr, mid, message)
            elif mtype == codec.RST:
                self._reset(addr, mid)
            return None
        if codec.is_request(message_code):
            if mtype == codec.CON:
                return self._request(message, addr, self.con_seen)
            if mtype == codec.NON:
                return self._request(message, addr, self.non_seen)
            return None  # a request in an ACK or RST is meaningless: silently ignored (§4.2, §4.3)
        # A response: we send no requests, except that an ACK may still acknowledge one of our CON messages.
        if mtype == codec.ACK:
            self._acked(addr, mid, message)
        elif mtype == codec.CON:
            self.write(codec.empty(codec.RST, mid), addr)  # no context for it: reject (§4.2)
        return None

    def _request(self, message: Message, addr: Address, seen_map: ExpiringMap) -> Exchange | None:
        now = self.clock.seconds()
        key = (addr[0], addr[1], message.mid)
        seen: _Seen | None = seen_map.get(key, now)
        if seen is not None:
            if message.type == codec.CON:
                if seen.reply is not None:
                    self.write(seen.reply, addr)  # the identical bytes: piggy-backed answer or empty ACK
                elif seen.exchange is not None:
                    seen.exchange.ack_now()  # the peer is retransmitting: stop it, the answer comes separately
            return None
        seen = _Seen(None)
        exchange = Exchange(self, message, addr, seen)
        seen.exchange = exchange
        seen_map.put(key, seen, now)
        return exchange

    def _acked(self, addr: Address, mid: int, message: Message) -> None:
        outgoing = self.outgoing.pop((addr, mid), None)
        if outgoing is None:
            return
        self._cancel_timer(outgoing)
        if outgoing.on_ack is not None:
            outgoing.on_ack(message)

    def _reset(self, addr: Address, mid: int) -> None:
        outgoing = self.outgoing.pop((addr, mid), None)
        if outgoing is not None:
            self._cancel_timer(outgoing)
            if outgoing.on_reset is not None:
                outgoing.on_reset()
            return
        on_reset = self.non_sent.pop((addr, mid))
        if on_reset is not None:
            on_reset()

    # --- outbound -------------------------------------------------------------------------------------------------

    def send_con(self, message: Message, addr: Address, on_ack: Callable[[Message], None] | None = None,
                 on_reset: Callable[[], None] | None = None,
                 on_timeout: Callable[[], None] | None = None) -> Outgoing:
        message.type = codec.CON
        message.mid = self.next_mid(addr)
        data = codec.encode(message)
        timeout = ACK_TIMEOUT * (1.0 + self.random() * (ACK_RANDOM_FACTOR - 1.0))
        now = self.clock.seconds()
        outgoing = Outgoing(addr, message.mid, data, timeout, on_ack, on_reset, on_timeout, now)
        if self.stopped:  # a late answer after shutdown: nothing to send it on, no timer to leave behind
            return outgoing
        self.outgoing[(addr, message.mid)] = outgoing
        self.write(data, addr)
        outgoing.call = self.clock.callLater(timeout, self._retransmit, outgoing)
        return outgoing

    def send_non(self, message: Message, addr: Address, on_reset: Callable[[], None] | None = None) -> int:
        message.type = codec.NON
        message.mid = self.next_mid(addr)
        data = codec.encode(message)
        if on_reset is not None:
            self.non_sent.put((addr, message.mid), on_reset, self.clock.seconds())
        self.write(data, addr)
        return message.mid

    def cancel(self, outgoing: Outgoing | None) -> None:
        """Stop retransmitting (the message is obsolete); a later ACK or RST for it is ignored."""
        if outgoing is None:
            return
        if self.outgoing.get((outgoing.addr, outgoing.mid)) is outgoing:
            del self.outgoing[(outgoing.addr, outgoing.mid)]
        self._cancel_timer(outgoing)

    def _retransmit(self, outgoing: Outgoing) -> None:
        outgoing.call = None
        if self.outgoing.get((outgoing.addr, outgoing.mid)) is not outgoing:
            return
        if outgoing.retransmits >= MAX_RETRANSMIT:
            del self.outgoing[(outgoing.addr, outgoing.mid)]
            log.debug("coap: CON mid={mid} to {addr} unacknowledged after {n} retransmissions, giving up",
                      mid=outgoing.mid, addr=outgoing.addr, n=outgoing.retransmits)
            if outgoing.on_timeout is not None:
                outgoing.on_timeout()
            return
        outgoing.retransmits += 1
        outgoing.timeout *= 2
        self.write(outgoing.data, outgoing.addr)
        outgoing.call = self.clock.callLater(outgoing.timeout, self._retransmit, outgoing)

    @staticmethod
    def _cancel_timer(outgoing: Outgoing) -> None:
        if outgoing.call is not None and outgoing.call.active():
            outgoing.call.cancel()
        outgoing.call = None

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every timer this layer owns (the sweeper is stopped by its owner)."""
        self.stopped = True
        for outgoing in list(self.outgoing.values()):
            self._cancel_timer(outgoing)
        self.outgoing.clear()
        for seen_map in (self.con_seen, self.non_seen):
            for seen in seen_map.values():
                if seen.exchange is not None:
                    seen.exchange._cancel_piggyback()
                    seen.exchange.responded = True
            seen_map.clear()
        self.non_sent.clear()
        self.mids.clear()
