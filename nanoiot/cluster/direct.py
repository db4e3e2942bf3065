"""Direct links between nodes: a routed call costs a socket write instead of a PostgreSQL round trip.

A :class:`DirectRouter` is a :class:`~nanoiot.cluster.router.Router` in front of the NOTIFY router. Each node
listens on a TCP port of its own (``--cluster-link-host``, loopback by default: the nodes of ``nanoiot run
--processes N``) and says so on the bus when it starts (a ``link-hello`` broadcast with its address, its machine
and a secret drawn at start). Every node that hears it connects, presenting the secret (only what can read the
cluster's NOTIFY traffic, i.e. holds the database's credentials, can use a link). One TCP connection then carries
both directions between the two nodes, each envelope a frame: 4 bytes of big-endian length, then the envelope's
JSON (:mod:`nanoiot.cluster.codec`: a routed command as a compact array, anything else as the bus's object). The
handshake names the frame format (``codec.LINK_FORMAT``): nodes of different formats do not link, and keep to the
bus. A link's writes go out once per reactor turn, with the HTTP and MQTT connections' (``TurnFlusher``), not
through a write-readiness poll per frame.

The bus stays the way in and the fallback: an envelope for a node with no link (not announced yet, on another
machine behind a loopback address, link lost) goes over NOTIFY, and so do broadcasts (every node hears them, and
their order against the claims' database writes is the bus's). Delivery stays at most once, as on the bus: frames
in flight when a link breaks are lost and every caller keeps its own deadline. A link that breaks is dialled again
by the node that dialled it (a few times, with growing delays); a node that restarts announces itself again.
Envelopes sent over the bus before a link came up may arrive after later ones sent over it (the switch happens
once per pair of nodes).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import struct
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nanoiot.cluster import codec
from nanoiot.cluster.router import NotifyRouter, Receiver
from nanoiot.transports.tcp import TurnFlusher, TurnWrites, listen_tcp

log = Logger(namespace="nanoiot.cluster")

#: The bus envelope announcing a node's link address; the first frame on a new link (the dialler's name and the
#: secret it was told).
HELLO = "link-hello"
HI = "link-hi"
#: A frame longer than this is a broken or hostile peer: the link is closed.
MAX_FRAME = 16 * 1024 * 1024
#: Bytes a link may hold unsent while the peer does not read before ``send`` refuses (as the bus's queue does).
MAX_BACKLOG = 8 * 1024 * 1024
#: A lost link is dialled again this many times, after 0.5, 1, 2, 4 ... s.
REDIAL_ATTEMPTS = 6
REDIAL_DELAY = 0.5
#: A dial that has not connected after this many seconds has failed.
DIAL_TIMEOUT = 5.0
#: Pending connections on the link port (one per other node, at most a few at once).
LISTEN_BACKLOG = 50

_LENGTH = struct.Struct(">I")


def machine_id() -> str:
    """This machine, as far as loopback addresses go: its host name and boot id (containers share neither)."""
    boot = ""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                boot = f.read().strip()
            break
        except OSError:
            continue
    return f"{socket.gethostname()}/{boot}"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@implementer(IPushProducer)
class Link(Protocol):
    """One node-to-node connection: length-prefixed JSON envelopes both ways."""

    def __init__(self, router: DirectRouter, peer: str | None, peer_secret: str = "", attempt: int = 0) -> None:
        self.router = router
        #: Which dial this is (0: the first after an announcement); a link the peer accepted counts from 0 again.
        self.attempt = attempt
        #: The other node; None on an accepted link until its first frame names it.
        self.peer = peer
        self.dialled = peer is not None
        self.peer_secret = peer_secret
        self._buffer = b""
        self.paused = False
        self._backlog = 0
        self.connected = False
        #: A dialled link is up once the peer has accepted it (answered our hello); an accepted one at once.
        self.up = False
        self.frames_in = 0
        self.frames_out = 0

    # -- sending --------------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.router.open_links.add(self)
        self.transport.registerProducer(self, True)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:  # frames are sent once per turn already: Nagle would only hold them back
            no_delay(True)
        if self.peer is not None:  # we dialled: say who we are, with the secret the peer announced
            self.write_envelope({"t": HI, "from": self.router.node, "s": self.peer_secret, "v": codec.LINK_FORMAT})

    def write_envelope(self, envelope: dict[str, Any]) -> bool:
        data = codec.encode_frame(envelope)
        if len(data) > MAX_FRAME:
            return False
        if self.paused:
            if self._backlog + len(data) > MAX_BACKLOG:
                return False
            self._backlog += len(data)
        self.transport.writeSequence((_LENGTH.pack(len(data)), data))
        self.frames_out += 1
        return True

    def pauseProducing(self) -> None:
        """The socket's buffer is full: count what is written meanwhile, so that a peer that stopped reading
        cannot make this node hold unbounded memory."""
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._backlog = 0

    def stopProducing(self) -> None:
        self.paused = True

    # -- receiving ------------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        offset, end = 0, len(buffer)
        while end - offset >= 4:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > MAX_FRAME:
                log.warn("cluster: link from {peer} sent a frame of {size} bytes; closing it", peer=self.peer,
                         size=size)
                self._buffer = b""
                self.transport.loseConnection()
                return
            if end - offset - 4 < size:
                break
            frame = buffer[offset + 4:offset + 4 + size]
            offset += 4 + size
            if not self._frame(frame):
                self._buffer = b""
                self.transport.abortConnection()
                return
        self._buffer = buffer[offset:] if offset < end else b""

    def _frame(self, frame: bytes) -> bool:
        try:
            envelope = codec.decode_frame(frame, self.router.uuids)
        except codec.CodecError as exc:
            log.warn("cluster: unreadable frame from {peer} dropped: {error}", peer=self.peer, error=exc)
            return self.peer is not None
        if not self.up:
            if self.peer is None:  # an accepted link: the first frame must be a hello with our secret
                return self.router.link_accepted(self, envelope)
            return self.router.link_answered(self, envelope)  # a dialled one: the peer's answer
        self.frames_in += 1
        self.router.frame_received(self, envelope)
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.router.link_down(self)


class _LinkClient(TurnWrites, tcp.Client):
    """A dialled link's connection, its writes sent by the turn's :class:`TurnFlusher` once connected, as the
    accepted side's are (``CoalescingServer``): every frame of a turn in one ``send``, no write-readiness poll per
    frame. While connecting, Twisted's own path (it waits for write readiness to learn the outcome)."""

    flusher: TurnFlusher

    def turn_flusher(self) -> TurnFlusher:
        return self.flusher

    def startWriting(self) -> None:
        if self.connected:
            TurnWrites.startWriting(self)
        else:
            tcp.Client.startWriting(self)

    def stopWriting(self) -> None:
        if self.connected:
            TurnWrites.stopWriting(self)
        else:
            tcp.Client.stopWriting(self)


class _LinkConnector(tcp.Connector):
    def __init__(self, host: str, port: int, factory: ClientFactory, timeout: float, reactor: Any,
                 flusher: TurnFlusher) -> None:
        super().__init__(host, port, factory, timeout, None, reactor)
        self.flusher = flusher

    def _makeTransport(self) -> tcp.Client:
        client = _LinkClient(self.host, self.port, self.bindAddress, self, self.reactor)
        client.flusher = self.flusher
        return client


class _Dialler(ClientFactory):
    def __init__(self, router: DirectRouter, peer: str, secret: str, attempt: int) -> None:
        self.router = router
        self.peer = peer
        self.secret = secret
        self.attempt = attempt

    def buildProtocol(self, addr: Any) -> Link:
        return Link(self.router, self.peer, self.secret, self.attempt)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.router.dial_failed(self.peer, self.attempt, reason)


class _Acceptor(Factory):
    def __init__(self, router: DirectRouter) -> None:
        self.router = router

    def buildProtocol(self, addr: Any) -> Link:
        return Link(self.router, None)


class DirectRouter:
    """Routing over direct links where the nodes have one, over the NOTIFY router otherwise (and for broadcasts)."""

    def __init__(self, fallback: NotifyRouter, reactor: Any, host: str, machine: str,
                 secret: str | None = None, port: int = 0, flusher: TurnFlusher | None = None) -> None:
        self.fallback = fallback
        self.node = fallback.node
        self.reactor = reactor
        self.host = host
        self.listen_port = port
        #: Which machine this node runs on: a loopback address announced by a node elsewhere is not dialled.
        self.machine = machine
        self.secret = secret if secret is not None else secrets.token_urlsafe(24)
        self.links: dict[str, Link] = {}
        #: node -> (host, port, secret, machine) of its last announcement: where to dial it again.
        self._addresses: dict[str, tuple[str, int, str]] = {}
        self._dialling: set[str] = set()
        self._timers: dict[str, Any] = {}
        #: Every connected link (accepted ones before their hello too), to close them all on stop.
        self.open_links: set[Link] = set()
        self._receive: Receiver | None = None
        self._port: Any = None
        self._running = False
        self.sent_direct = 0
        self.received_direct = 0
        #: Sends what the links wrote during a turn (the service may hand in the one of its HTTP and MQTT ports,
        #: so that all of a turn's writes go out in one pass).
        self.flusher = flusher if flusher is not None else TurnFlusher(reactor)
        #: Ids the links' frames named before, parsed once (codec.decode_frame).
        self.uuids: dict[str, Any] = {}

    @property
    def sent(self) -> int:
        return self.fallback.sent + self.sent_direct

    @property
    def received(self) -> int:
        return self.fallback.received + self.received_direct

    def start(self, receive: Receiver) -> Deferred[None]:
        self._receive = receive
        self._running = True
        self._port = listen_tcp(self.reactor, self.listen_port, _Acceptor(self), LISTEN_BACKLOG, self.host,
                                flusher=self.flusher)
        d = self.fallback.start(self._from_bus)
        d.addCallback(lambda _: self.fallback.broadcast(self._hello()))
        return d.addCallback(lambda _: None)

    def port(self) -> int:
        return int(self._port.getHost().port)

    def _hello(self) -> dict[str, Any]:
        return {"t": HELLO, "h": self.host, "p": self.port(), "s": self.secret, "m": self.machine}

    # -- the Router interface -------------------------------------------------------------------------------------

    def send(self, node: str, envelope: dict[str, Any]) -> bool:
        link = self.links.get(node)
        if link is not None:
            envelope["from"] = self.node
            if link.write_envelope(envelope):
                self.sent_direct += 1
                return True
            if link.paused:
                return False  # the peer is not reading: refuse, as a full bus queue does
        return self.fallback.send(node, envelope)  # not linked, or too large for a frame

    def broadcast(self, envelope: dict[str, Any]) -> bool:
        return self.fallback.broadcast(envelope)

    def stop(self) -> Deferred[None]:
        if self._running:
            log.info("cluster: {direct} envelopes sent over direct links, {bus} over the bus (broadcasts included)",
                     direct=self.sent_direct, bus=self.fallback.sent + self.fallback.broadcasts)
        self._running = False
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for link in list(self.open_links):
            link.transport.loseConnection()
        self.links.clear()
        stopped = self._port.stopListening() if self._port is not None else None
        d = stopped if isinstance(stopped, Deferred) else succeed(None)
        return d.addCallback(lambda _: self.fallback.stop())

    # -- the bus --------------------------------------------------------------------------------------------------

    def _from_bus(self, envelope: dict[str, Any]) -> None:
        if envelope.get("t") == HELLO:
            self._heard_hello(envelope)
            return
        assert self._receive is not None
        self._receive(envelope)

    def _heard_hello(self, envelope: dict[str, Any]) -> None:
        node = envelope.get("from")
        try:
            host, port, secret, machine = str(envelope["h"]), int(envelope["p"]), str(envelope["s"]), envelope["m"]
        except (KeyError, TypeError, ValueError):
            log.warn("cluster: bad link announcement from {node} ignored", node=node)
            return
        if not isinstance(node, str) or node == self.node or not self._running:
            return
        if _loopback(host) and machine != self.machine:
            return  # a loopback address on another machine: that node stays behind the bus
        self._addresses[node] = (host, port, secret)
        link = self.links.get(node)
        if link is not None:
            if link.peer_secret == secret or not link.peer_secret:
                return  # linked already (it dialled us, or we it)
            link.transport.loseConnection()  # the node restarted: its old link is dead, dial the new one
            self.links.pop(node, None)
        self._dial(node, 0)

    # -- links ----------------------------------------------------------------------------------------------------

    def _dial(self, node: str, attempt: int) -> None:
        self._timers.pop(node, None)
        address = self._addresses.get(node)
        if address is None or not self._running or node in self.links or node in self._dialling:
            return
        host, port, secret = address
        self._dialling.add(node)
        dialler = _Dialler(self, node, secret, attempt)
        if isinstance(self.reactor, PosixReactorBase):
            _LinkConnector(host, port, dialler, DIAL_TIMEOUT, self.reactor, self.flusher).connect()
        else:
            self.reactor.connectTCP(host, port, dialler, timeout=DIAL_TIMEOUT)

    def dial_failed(self, node: str, attempt: int, reason: Failure) -> None:
        self._dialling.discard(node)
        if attempt == 0:
            log.info("cluster: no direct link to node {node} ({error}); using the bus", node=node,
                     error=reason.getErrorMessage())
        self._redial(node, attempt + 1)

    def _redial(self, node: str, attempt: int) -> None:
        if not self._running or attempt > REDIAL_ATTEMPTS or node in self._timers:
            return
        delay = REDIAL_DELAY * 2 ** (attempt - 1)
        self._timers[node] = self.reactor.callLater(delay, self._dial, node, attempt)

    def link_answered(self, link: Link, envelope: dict[str, Any]) -> bool:
        """The peer accepted a link we dialled: envelopes for it take the link from now on."""
        assert link.peer is not None
        if envelope.get("t") != HI or envelope.get("from") != link.peer or not self._running:
            log.warn("cluster: node {node} did not accept our link", node=link.peer)
            return False
        if not self._same_format(link.peer, envelope):
            self._addresses.pop(link.peer, None)  # not dialled again until it announces itself anew (restarted)
            return False
        self._dialling.discard(link.peer)
        link.up = True
        link.attempt = 0
        self.links[link.peer] = link
        log.info("cluster: direct link to node {node} up", node=link.peer)
        return True

    def link_accepted(self, link: Link, envelope: dict[str, Any]) -> bool:
        """The first frame of a link another node dialled: its name and our secret, else the link is closed."""
        node, secret = envelope.get("from"), envelope.get("s")
        if envelope.get("t") != HI or not isinstance(node, str) or not isinstance(secret, str) \
                or not hmac.compare_digest(secret.encode(), self.secret.encode()) or not self._running:
            log.warn("cluster: a link without this node's secret was refused")
            return False
        if not self._same_format(node, envelope):
            return False
        link.peer = node
        link.up = True
        link.write_envelope({"t": HI, "from": self.node, "v": codec.LINK_FORMAT})
        if node not in self.links:
            self.links[node] = link
            log.info("cluster: direct link from node {node} up", node=node)
        return True

    def _same_format(self, node: str, hi: dict[str, Any]) -> bool:
        """Whether the peer's link handshake names this node's frame format (a node from before the compact
        frames names none: format 1); a node of another version stays behind the bus, which both still read."""
        theirs = hi.get("v", 1)
        if theirs == codec.LINK_FORMAT:
            return True
        log.warn("cluster: no direct link with node {node}: it speaks link format {theirs}, this node {ours} "
                 "(different NanoIoT versions); their messages take the bus", node=node, theirs=theirs,
                 ours=codec.LINK_FORMAT)
        return False

    def frame_received(self, link: Link, envelope: dict[str, Any]) -> None:
        self.received_direct += 1
        envelope["from"] = link.peer  # the link's node, whatever the frame says
        assert self._receive is not None
        self._receive(envelope)

    def link_down(self, link: Link) -> None:
        self.open_links.discard(link)
        if link.peer is None:
            return
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
            if self._running:
                log.info("cluster: direct link with node {node} lost; using the bus", node=link.peer)
        if not link.dialled or link.peer not in self._dialling and not link.up:
            return  # accepted: the peer dials again if it wants to
        self._dialling.discard(link.peer)
        if self._running and link.peer in self._addresses and link.peer not in self.links:
            self._redial(link.peer, link.attempt + 1)  # ours to dial again (if it dialled us, it will)
