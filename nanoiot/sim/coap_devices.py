"""Simulated devices on ThingsBoard's CoAP device API, for ``nanoiot-sim --transport coap``.

Each device is one asyncio ``DatagramProtocol`` on its own UDP socket, so the server sees one (host, port) per
device, and speaks CoAP through NanoIoT's codec (``nanoiot.transports.coap.codec``):

* it registers for commands with a confirmable ``GET /api/v1/{token}/rpc``, ``Observe: 0``; it counts as connected
  when the 2.03 answer arrived;
* each command arrives as a 2.05 notification ``{"id","method","params"}`` on the registration's token: the device
  ACKs it (when confirmable; the ACK marks it DELIVERED), applies its answer behaviour and answers with a
  confirmable ``POST .../rpc/{id}`` (2.01 expected, piggy-backed);
* device-to-server calls are a confirmable ``POST .../rpc`` ``{"method","params"}`` (2.05, piggy-backed or
  separate: an empty ACK first, then a confirmable response the device ACKs);
* ``disconnect`` answers the notification with an RST instead of an ACK (which cancels the observation: the server
  puts the command back in the device's queue) and registers again after 1 s.

Confirmable requests are retransmitted like a simple real client does: every 2 s, up to 4 times. Duplicated
confirmable messages from the server get the same ACK (or RST) again and are not handled twice. Notifications and
answers larger than a block are fetched block by block (Block2, RFC 7959). A final response on the registration's
token without Observe (the server ended the observation) makes the device register again after 1 s.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from nanoiot.sim.http_devices import call_body, plan_answer
from nanoiot.transports.coap import codec

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from coapthon.messages.message import Message

#: Seconds between retransmissions of a confirmable request, and how many retransmissions at most.
RETRANSMIT_TIMEOUT = 2.0
MAX_RETRANSMIT = 4
#: Seconds to wait for a separate response once the server acknowledged a request with an empty ACK (the server
#: answers a call it could not answer within 60 s with ``{"error":"timeout"}``).
SEPARATE_RESPONSE_TIMEOUT = 90.0
#: Seconds between the end of an observation (``disconnect``, or the server's) and the next registration.
REREGISTER_DELAY = 1.0
#: Confirmable messages from the server remembered (by message id) to answer their duplicates.
SEEN_MIDS = 64


class CoapTimeout(Exception):
    """A confirmable request was not acknowledged after every retransmission, or its separate response never came."""


class CoapReset(Exception):
    """The server answered a request with an RST."""


class _Pending:
    """A confirmable request of ours: retransmitted until acknowledged, resolved by its response."""

    __slots__ = ("mid", "token", "data", "future", "retransmits", "timer")

    def __init__(self, mid: int, token: bytes, data: bytes, future: asyncio.Future) -> None:
        self.mid = mid
        self.token = token
        self.data = data
        self.future = future
        self.retransmits = 0
        self.timer: asyncio.TimerHandle | None = None


class CoapDevice(asyncio.DatagramProtocol):
    def __init__(self, fleet: CoapFleet, access_token: str) -> None:
        self.fleet = fleet
        self.stats = fleet.stats
        self.behaviour = fleet.behaviour
        self.loop = asyncio.get_running_loop()
        self.path = ("api", "v1", access_token, "rpc")
        self.transport: asyncio.DatagramTransport | None = None
        self.next_mid = random.randrange(0x10000)
        self.next_token = random.randrange(1 << 32)
        #: mid -> request awaiting its ACK; token -> request awaiting its response.
        self.by_mid: dict[int, _Pending] = {}
        self.by_token: dict[bytes, _Pending] = {}
        #: The token of the current observation (None while not registered).
        self.observe_token: bytes | None = None
        #: mid -> the bytes we answered a confirmable message from the server with (ACK or RST), for duplicates.
        self.seen: OrderedDict[int, bytes] = OrderedDict()
        self.tasks: set[asyncio.Future] = set()
        self.timers: set[asyncio.TimerHandle] = set()
        self.call_timer: asyncio.TimerHandle | None = None
        self.running = True
        self.closed = False

    # --- asyncio hooks --------------------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable and the like: retransmission (or giving up) handles it

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = codec.decode(data, addr)
        except codec.CoapDecodeError:
            return
        mtype, mid, message_code = message.type, message.mid, message.code or codec.EMPTY
        if message_code == codec.EMPTY:
            if mtype == codec.ACK:
                pending = self.by_mid.pop(mid, None)
                if pending is not None:
                    self._cancel_timer(pending)
                    # The answer comes separately: give it a while.
                    pending.timer = self.loop.call_later(SEPARATE_RESPONSE_TIMEOUT, self._give_up, pending)
            elif mtype == codec.RST:
                pending = self.by_mid.pop(mid, None)
                if pending is not None:
                    self._forget(pending)
                    if not pending.future.done():
                        pending.future.set_exception(CoapReset())
            elif mtype == codec.CON:
                self._send(codec.empty(codec.RST, mid))  # a ping
            return
        if not codec.is_response(message_code):
            if mtype == codec.CON:
                self._send(codec.empty(codec.RST, mid))  # we serve nothing
            return
        if mtype == codec.ACK:  # a piggy-backed response
            pending = self.by_mid.get(mid)
            if pending is not None and pending.token == (message.token or b""):
                self._resolve(pending, message)
            return
        if mtype == codec.CON:
            reply = self.seen.get(mid)
            if reply is not None:
                self._send(reply)  # a retransmission: the same answer, handled once
                return
        token = message.token or b""
        pending = self.by_token.get(token)
        if pending is not None:
            if token == self.observe_token and self._is_notification(message):
                self._resolve(pending, message)  # a first notification overtook the 2.03: registered all the same
                self._on_observe(message)
            else:
                self._ack(message)
                self._resolve(pending, message)
        elif token and token == self.observe_token:
            self._on_observe(message)
        elif mtype == codec.CON:
            self._reject(message)  # nothing of ours asked for it (RFC 7252 §4.2)

    # --- sending --------------------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.sendto(data)

    def _remember(self, mid: int, reply: bytes) -> None:
        self.seen[mid] = reply
        while len(self.seen) > SEEN_MIDS:
            self.seen.popitem(last=False)

    def _ack(self, message: Message) -> None:
        if message.type == codec.CON:
            reply = codec.empty(codec.ACK, message.mid)
            self._remember(message.mid, reply)
            self._send(reply)

    def _reject(self, message: Message) -> None:
        reply = codec.empty(codec.RST, message.mid)
        if message.type == codec.CON:
            self._remember(message.mid, reply)
        self._send(reply)

    def _new_mid(self) -> int:
        for _ in range(0x10000):
            self.next_mid = (self.next_mid + 1) & 0xFFFF
            if self.next_mid not in self.by_mid:
                break
        return self.next_mid

    def _new_token(self) -> bytes:
        self.next_token = (self.next_token + 1) & 0xFFFFFFFF
        return self.next_token.to_bytes(4, "big")

    def request(self, message_code: int, path: tuple[str, ...], payload: bytes = b"",
                options: list[tuple[int, Any]] | None = None, token: bytes | None = None) -> asyncio.Future:
        """Send a confirmable request; the future gets its response (a coapthon message)."""
        token = token or self._new_token()
        mid = self._new_mid()
        all_options = [(codec.URI_PATH, segment) for segment in path] + list(options or [])
        if payload:
            all_options.append((codec.CONTENT_FORMAT, codec.JSON_FORMAT))
        data = codec.encode(codec.build(codec.CON, message_code, mid, token, all_options, payload))
        future: asyncio.Future = self.loop.create_future()
        pending = _Pending(mid, token, data, future)
        self.by_mid[mid] = pending
        self.by_token[token] = pending
        self._send(data)
        pending.timer = self.loop.call_later(RETRANSMIT_TIMEOUT, self._retransmit, pending)
        return future

    async def fetch(self, message_code: int, path: tuple[str, ...], payload: bytes = b"",
                    options: list[tuple[int, Any]] | None = None, token: bytes | None = None) -> tuple[Any, bytes]:
        """A request and its whole response: (first response, payload of every Block2 block together)."""
        response = await self.request(message_code, path, payload, options, token)
        return response, await self._rest_of(response, message_code, path, response.payload or b"")

    async def _rest_of(self, response: Message, message_code: int, path: tuple[str, ...], body: bytes) -> bytes:
        """Follow Block2 when ``response`` is only the first block of a larger representation."""
        block = codec.block_value(response, codec.BLOCK2)
        while block is not None and block[1]:
            num, _, szx = block
            response = await self.request(message_code, path, options=[
                (codec.BLOCK2, codec.block_option(num + 1, False, szx))])
            if codec.code_text(response.code)[0] != "2":
                raise CoapTimeout(f"block {num + 1}: {codec.code_text(response.code)}")
            body += response.payload or b""
            block = codec.block_value(response, codec.BLOCK2)
        return body

    def _retransmit(self, pending: _Pending) -> None:
        pending.timer = None
        if self.by_mid.get(pending.mid) is not pending:
            return
        if pending.retransmits >= MAX_RETRANSMIT:
            self._give_up(pending)
            return
        pending.retransmits += 1
        self._send(pending.data)
        pending.timer = self.loop.call_later(RETRANSMIT_TIMEOUT, self._retransmit, pending)

    def _give_up(self, pending: _Pending) -> None:
        pending.timer = None
        self._forget(pending)
        if not pending.future.done():
            pending.future.set_exception(CoapTimeout())

    def _resolve(self, pending: _Pending, message: Message) -> None:
        self._forget(pending)
        if not pending.future.done():
            pending.future.set_result(message)

    def _forget(self, pending: _Pending) -> None:
        self._cancel_timer(pending)
        if self.by_mid.get(pending.mid) is pending:
            del self.by_mid[pending.mid]
        if self.by_token.get(pending.token) is pending:
            del self.by_token[pending.token]

    @staticmethod
    def _cancel_timer(pending: _Pending) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
        pending.timer = None

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: lost datagrams are this simulator's daily bread, not worth a traceback

    def _later(self, delay: float, callback: Any, *args: Any) -> None:
        def fire() -> None:
            self.timers.discard(handle)
            callback(*args)

        handle = self.loop.call_later(delay, fire)
        self.timers.add(handle)

    # --- observation ----------------------------------------------------------------------------------------------

    async def register(self) -> bool:
        """Register for commands (GET Observe=0, CON); True once the 2.03 arrived."""
        token = self._new_token()
        self.observe_token = token  # a notification overtaking the 2.03 still counts
        try:
            response = await self.request(codec.GET, self.path, options=[(codec.OBSERVE, 0)], token=token)
        except (CoapTimeout, CoapReset):
            if self.observe_token == token:
                self.observe_token = None
            return False
        if response.code not in (codec.VALID, codec.CONTENT) or codec.observe_value(response) is None:
            if self.observe_token == token:
                self.observe_token = None
            if response.code == codec.UNAUTHORIZED:
                self.fleet.unauthorized += 1
            return False
        return True

    @staticmethod
    def _is_notification(message: Message) -> bool:
        return message.code == codec.CONTENT and codec.observe_value(message) is not None

    def _on_observe(self, message: Message) -> None:
        """A message on the observation's token: a command, or the server ending the observation."""
        if not self._is_notification(message):
            # A final response (2.02 replaced, 4.04 deleted, 5.03): the observation is over on the server's side.
            self._ack(message)
            self.observe_token = None
            self._reregister_later()
            return
        if self.behaviour.answer == "disconnect":
            # Refuse the notification: an RST cancels the observation and the command goes back to the queue.
            self.stats.commands += 1
            self.stats.disconnects += 1
            self._reject(message)
            self.observe_token = None
            self._reregister_later()
            return
        self._ack(message)
        self._spawn(self._command(message))

    async def _command(self, message: Message) -> None:
        body = message.payload or b""
        if codec.block_value(message, codec.BLOCK2) is not None:
            body = await self._rest_of(message, codec.GET, self.path, body)
        try:
            command = json.loads(body)
            request_id = int(command["id"])
        except (ValueError, TypeError, KeyError):
            return
        self.stats.commands += 1
        plan = plan_answer(self.behaviour, self.stats, command)
        if plan is None:
            return
        delay, answer = plan
        if delay > 0:
            await asyncio.sleep(delay)
        if not self.running:
            return
        response = await self.request(codec.POST, self.path + (str(request_id),), answer)
        if response.code == codec.CREATED:
            self.stats.answered += 1

    def _reregister_later(self) -> None:
        if self.running:
            self._later(REREGISTER_DELAY, lambda: self._spawn(self._reregister()))

    async def _reregister(self) -> None:
        while self.running and self.observe_token is None:
            if await self.register():
                self.stats.reconnects += 1
                return
            await asyncio.sleep(REREGISTER_DELAY)

    # --- device-to-server calls -----------------------------------------------------------------------------------

    def schedule_call(self) -> None:
        if self.running:
            jitter = random.uniform(0.5, 1.5) * self.behaviour.call_interval
            self.call_timer = self.loop.call_later(jitter, self._call)

    def _call(self) -> None:
        self.call_timer = None
        if not self.running:
            return
        self.stats.calls += 1
        self._spawn(self._call_once(time.perf_counter()))
        self.schedule_call()

    async def _call_once(self, started: float) -> None:
        response, _ = await self.fetch(codec.POST, self.path, call_body(self.behaviour))
        if codec.code_text(response.code)[0] == "2":
            self.stats.call_answers += 1
            self.stats.call_latencies.append(time.perf_counter() - started)

    # --- the end --------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self.running = False
        if self.call_timer is not None:
            self.call_timer.cancel()
            self.call_timer = None
        for handle in list(self.timers):
            handle.cancel()
        self.timers.clear()
        for pending in list(self.by_mid.values()) + list(self.by_token.values()):
            self._forget(pending)
            if not pending.future.done():
                pending.future.cancel()
        for task in list(self.tasks):
            task.cancel()
        if self.observe_token is not None and self.transport is not None and not self.closed:
            # Tell the server politely (Observe: 1 deregisters); not waited for.
            data = codec.encode(codec.build(codec.NON, codec.GET, self._new_mid(), self.observe_token,
                                            [(codec.URI_PATH, s) for s in self.path] + [(codec.OBSERVE, 1)]))
            self._send(data)
        self.observe_token = None
        if self.transport is not None:
            self.transport.close()


class CoapFleet:
    """The CoAP devices of one ``nanoiot-sim`` process; the same interface as the MQTT ``Fleet``."""

    def __init__(self, args: argparse.Namespace, tokens: list[str], stats: Any, behaviour: Any) -> None:
        self.args = args
        self.tokens = tokens
        self.stats = stats
        self.behaviour = behaviour
        self.devices: list[CoapDevice | None] = [None] * len(tokens)
        #: Devices the server answered 4.01 Unauthorized.
        self.unauthorized = 0
        self.running = True

    async def connect(self, index: int) -> bool:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        device = CoapDevice(self, self.tokens[index])
        try:
            await loop.create_datagram_endpoint(
                lambda: device, remote_addr=(self.args.host, self.args.port),
                local_addr=(self.args.bind, 0) if self.args.bind else None)
        except OSError:
            return False
        if not await device.register():
            device.stop()
            return False
        self.devices[index] = device
        self.stats.connect_latencies.append(time.perf_counter() - started)
        if self.behaviour.call_method:
            device.schedule_call()
        return True

    def close(self) -> None:
        self.running = False
        for device in self.devices:
            if device is not None:
                device.stop()
