"""Direct links on the real reactor and real loopback sockets: both ends (the dialled ``_LinkClient`` and the
accepted ``CoalescingServer``) send a turn's frames in one ``send`` from the turn's flush, without registering for
write readiness, and a peer that stops reading gets Twisted's buffer and then every frame in order.

The two DirectRouters talk over the in-memory bus of tests/unit/test_direct_router.py (delivery on the next turn
of the real reactor); only the link is a real TCP connection. These pin the private Twisted attributes the dialled
end relies on (``tcp.Client``'s connect path, FileDescriptor's buffers, doWrite): an upgrade that changes them
fails here.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import uuid4

import pytest_twisted
from twisted.internet import reactor, task

from nanoiot.actors import messages as m
from nanoiot.actors.replies import ReplyTo
from nanoiot.cluster.direct import DirectRouter, _LinkClient
from nanoiot.cluster.router import NotifyRouter
from nanoiot.rpc.model import RpcCommand
from nanoiot.transports.tcp import CoalescingServer
from tests.fixtures.processes import wait_until
from tests.unit.test_direct_router import MemoryBus


class Node:
    def __init__(self, name: str, channels: dict[str, Any]) -> None:
        self.bus = MemoryBus(channels, reactor)  # type: ignore[arg-type]
        self.router = DirectRouter(NotifyRouter(self.bus, name), reactor, "127.0.0.1", "box")
        self.got: list[dict[str, Any]] = []

    def start(self) -> None:
        self.router.start(self.got.append)


def count_sends(transport: Any) -> list[int]:
    sizes: list[int] = []
    original = transport.writeSomeData

    def counting(data: Any) -> Any:
        sizes.append(len(data))
        return original(data)

    transport.writeSomeData = counting
    return sizes


def tell(n: int) -> dict[str, Any]:
    device_id = uuid4()
    command = RpcCommand(rpc_id=uuid4(), tenant_id=uuid4(), device_id=device_id, method="m", params={"n": n},
                         oneway=False, expiration_time=2, created_time=1)
    return {"t": "tell", "d": device_id, "m": m.SubmitRpc(command, ReplyTo("A", n)), "hops": 0}


async def linked_pair() -> tuple[Node, Node]:
    """A starts, then B: A hears B's announcement and dials it."""
    channels: dict[str, Any] = {}
    a, b = Node("A", channels), Node("B", channels)
    a.start()
    b.start()
    await wait_until(lambda: "B" in a.router.links and "A" in b.router.links, 10, "the link between A and B")
    return a, b


async def stopped(*nodes: Node) -> None:
    for node in nodes:
        await node.router.stop()


async def arrived(node: Node, count: int, what: str) -> None:
    await wait_until(lambda: len(node.got) >= count, 10, what)


def sent_in_one_turn(router: DirectRouter, envelopes: list[Callable[[], dict[str, Any]]], peer: str) -> None:
    for make in envelopes:
        assert router.send(peer, make())


@pytest_twisted.ensureDeferred
async def test_a_turn_s_frames_leave_each_end_in_one_send_without_a_write_poll() -> None:
    a, b = await linked_pair()
    try:
        dialled, accepted = a.router.links["B"].transport, b.router.links["A"].transport
        assert isinstance(dialled, _LinkClient) and isinstance(accepted, CoalescingServer)
        for sender, receiver, transport, peer in ((a, b, dialled, "B"), (b, a, accepted, "A")):
            sends = count_sends(transport)
            sent_in_one_turn(sender.router, [lambda n=n: tell(n) for n in range(3)], peer)
            assert transport.fileno() not in reactor._writes  # nothing registered with epoll
            await arrived(receiver, 3, f"three frames at {peer}")
            assert len(sends) == 1, sends
            assert [e["m"].command.params["n"] for e in receiver.got] == [0, 1, 2]
            assert transport.fileno() not in reactor._writes
        assert a.bus.notified == [n for n in a.bus.notified if n[0] == "nanoiot_cluster"]  # nothing but the hello
    finally:
        await stopped(a, b)


@pytest_twisted.ensureDeferred
async def test_a_peer_that_stops_reading_gets_twisted_s_buffer_then_every_frame_in_order() -> None:
    a, b = await linked_pair()
    try:
        link = a.router.links["B"]
        b.router.links["A"].transport.stopReading()  # B stops reading
        payload = "x" * (1024 * 1024)
        frames = 6  # more than the loopback socket buffers hold
        for n in range(frames):
            assert a.router.send("B", {"t": "blob", "n": n, "p": payload})
        await task.deferLater(reactor, 0.05, lambda: None)
        assert link.transport._polling_writes  # waiting for the poller now
        b.router.links["A"].transport.startReading()
        await arrived(b, frames, "every frame once B reads again")
        assert [e["n"] for e in b.got] == list(range(frames))
        await wait_until(lambda: not link.transport._polling_writes, 10, "the dialled end drained")
        assert link.transport.fileno() not in reactor._writes
    finally:
        await stopped(a, b)
