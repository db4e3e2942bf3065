"""In-memory test doubles for the CoAP transport: a datagram transport that records what is written, an ``attach``
that hands every session a recording link (:mod:`nanoiot.transports.testing`), and a harness that plays devices
against a :class:`CoapServer` on a ``task.Clock`` (no sockets, no reactor, no actors, no sleeping)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from coapthon.messages.message import Message
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed

from nanoiot.transports.coap import codec
from nanoiot.transports.coap.server import CoapServer
from nanoiot.transports.testing import Attached, RecordingAttach, RecordingLink

DEVICE_ADDR = ("192.0.2.10", 5683)


class FakeDatagramTransport:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((bytes(data), addr))


@dataclass(frozen=True)
class FakeDevice:
    id: str
    name: str = "device"


@dataclass
class CoapHarness:
    tokens: dict[str, FakeDevice] = field(default_factory=lambda: {"good-token": FakeDevice("d1")})
    random_value: float = 0.0
    max_payload: int = 65536
    clock: task.Clock = field(default_factory=task.Clock)
    transport: FakeDatagramTransport = field(default_factory=FakeDatagramTransport)
    #: The server's ``attach``: every session gets its own RecordingLink.
    links: RecordingAttach = field(default_factory=RecordingAttach)
    #: When set, authenticate returns this Deferred (to test slow lookups) instead of answering at once.
    pending_lookup: Deferred | None = None

    def __post_init__(self) -> None:
        self.server = CoapServer(self._authenticate, self.links, self.clock, max_payload=self.max_payload,
                                 random=lambda: self.random_value)
        self.server.makeConnection(self.transport)
        self._mid = 100

    def _authenticate(self, token: str) -> Deferred:
        if self.pending_lookup is not None:
            return self.pending_lookup
        return succeed(self.tokens.get(token))

    @property
    def attached(self) -> list[Attached]:
        """Every ``attach`` call in order: device, session, exclusive, and the link it returned."""
        return self.links.attached

    @property
    def reports(self) -> list[tuple[int, tuple]]:
        """Every report on any link, in order, as ``(session id, call)``."""
        return self.links.reports

    def link(self, session: Any = None) -> RecordingLink:
        """The link of ``session`` (by default the most recent observe session)."""
        return self.links.link(self.session if session is None else session)

    # --- playing a device -----------------------------------------------------------------------------------------

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def request(self, code: int, path: Iterable[str], mtype: int = codec.CON, token: bytes = b"t1",
                options: Iterable[tuple[int, Any]] = (), payload: bytes = b"", mid: int | None = None,
                addr: tuple[str, int] = DEVICE_ADDR) -> int:
        mid = self.next_mid() if mid is None else mid
        message = codec.build(mtype, code, mid, token, [(codec.URI_PATH, p) for p in path] + list(options), payload)
        self.server.datagramReceived(codec.encode(message), addr)
        return mid

    def rpc_path(self, *extra: str, token: str = "good-token") -> list[str]:
        return ["api", "v1", token, "rpc", *extra]

    def register(self, mtype: int = codec.CON, token: bytes = b"obs", addr: tuple[str, int] = DEVICE_ADDR,
                 options: Iterable[tuple[int, Any]] = ()) -> Message:
        self.request(codec.GET, self.rpc_path(), mtype, token, [(codec.OBSERVE, 0), *options], addr=addr)
        (reply,) = self.take(addr)
        return reply

    def ack(self, message: Message, addr: tuple[str, int] = DEVICE_ADDR) -> None:
        self.server.datagramReceived(codec.empty(codec.ACK, message.mid), addr)

    def reset(self, message: Message, addr: tuple[str, int] = DEVICE_ADDR) -> None:
        self.server.datagramReceived(codec.empty(codec.RST, message.mid), addr)

    def take(self, addr: tuple[str, int] | None = None) -> list[Message]:
        """Decode and forget what the server wrote (to ``addr`` only, when given)."""
        kept, taken = [], []
        for data, to in self.transport.written:
            (taken if addr is None or to == addr else kept).append((data, to))
        self.transport.written = kept
        return [codec.decode(data, to) for data, to in taken]

    def take_raw(self) -> list[tuple[bytes, tuple[str, int]]]:
        taken, self.transport.written = self.transport.written, []
        return taken

    @property
    def session(self) -> Any:
        """The most recent observe session."""
        return [a.session for a in self.attached if a.exclusive][-1]

    def stop(self) -> None:
        """Stop the server; every timer it owned must be gone."""
        self.server.doStop()
        leftover = self.clock.getDelayedCalls()
        assert leftover == [], f"delayed calls left on the clock: {leftover}"
