"""The two-way command path below HTTP, in one process: CPU per command with no sockets, no load generator and no
other process, so that an A/B of a change to it is not lost in a shared machine's noise.

    python bench/command_path.py                          # this tree: 8 samples of 200 rounds of 64 commands
    python bench/command_path.py --baseline /tmp/before   # A/B: samples alternate between this tree and TREE

What one command is: ``CommandService.submit`` (the REST handler's call) -> the device's actor (the dispatcher's
and the actors' timed calls on the real epoll reactor, its ``runUntilCurrent`` called by hand; ``--clock task``:
on a ``task.Clock``, as at first, whose ``callLater`` sorts every pending call and so overstates timers) -> an
MQTT session on a ``StringTransport`` writes the PUBLISH -> the device's PUBACK and its answer
(QoS 1, as ``nanoiot-sim --answer echo`` sends them) are fed back in one read -> the answer's PUBACK is written and
the caller's Deferred fires. 200 devices connected, 64 commands in flight per round, metrics on and one listener of
status events (as the rule service is), as in ``twistd nanoiot``. Not included: twisted.web (the bare request's part,
``bench/rest_overhead.py`` measures it), the kernel's send and recv. CPU = ``time.process_time`` over the samples'
rounds ÷ commands answered (the harness's own encoding and decoding of the device side included: it is the same in
both trees). Each sample is a fresh process (``PYTHONPATH`` = the tree); min and median of the samples are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = r'''
import gc, sys, time
from uuid import uuid4
from prometheus_client import CollectorRegistry
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport
from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.actors.runtime import Dispatcher, set_dispatcher
from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.commands.presence import PresenceBook
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.metrics import ServerMetrics
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.rpc.body import parse_rpc_body
from nanoiot.rpc.queue import QueueSettings
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.protocol import MqttFactory

DEVICES, IN_FLIGHT, ROUNDS = 200, 64, int(sys.argv[1])
if sys.argv[2] == "reactor":
    from twisted.internet import reactor as clock  # the real reactor's timed calls (a heap), run by hand

    def advance():
        clock.runUntilCurrent()
        while clock._newTimedCalls:  # calls made by the calls just run (a drain's next turn) run now too
            clock.runUntilCurrent()
else:
    clock = task.Clock()  # its callLater sorts every pending call: timers cost far more than on a reactor
    clock.advance(1.7e9)

    def advance():
        clock.advance(0)
dispatcher = Dispatcher(clock)
set_dispatcher(dispatcher)
events = EventStream()
directory = DeviceDirectory(clock, ActorSettings(queue=QueueSettings()), events=events, dispatcher=dispatcher)
book = PresenceBook(clock, "")
book.start(events)
ServerMetrics(CollectorRegistry(), clock, process=False).start(events, book)
try:  # subscribed as the rule service subscribes (in trees that have it: persistent commands' changes only)
    events.subscribe(lambda event: None, (RpcStatusChanged,), persistent_only=True)
except TypeError:
    events.subscribe(lambda event: None, (RpcStatusChanged,))
tenant = uuid4()
by_token = {f"T{i}": Device(uuid4(), 0, tenant, NULL_UUID, f"d{i}", "default", None, None) for i in range(DEVICES)}
by_id = {device.id: device for device in by_token.values()}
factory = MqttFactory(lambda token: succeed(by_token.get(token)), directory.attach, clock, max_packet_size=1 << 20,
                      connect_timeout=10)
connections = {}
for token, device in by_token.items():
    protocol, transport = factory.buildProtocol(None), StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(codec.encode_connect("", protocol_level=4, username=token, keep_alive=0)
                          + codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4))
    connections[device.id] = (protocol, transport)
advance()
advance()


class Devices:
    def cached_device(self, device_id):
        return by_id.get(device_id)


service = CommandService(directory, directory.replies, Devices(), None, events, clock)
initiator = Initiator(tenant, None, uuid4())
ids = list(by_id)
answered = [0]
reader = codec.FrameReader(1 << 20)


def fired(result):
    assert result.ok and result.response == {"method": "echo", "params": {"i": 1}}, result
    answered[0] += 1


def one_round(r):
    for _, transport in connections.values():
        transport.clear()
    now = int(clock.seconds() * 1000)
    targets = [ids[(r * IN_FLIGHT + k) % DEVICES] for k in range(IN_FLIGHT)]
    for device_id in targets:
        body = parse_rpc_body({"method": "echo", "params": {"i": 1}}, now, 10000, 5000)
        service.submit(initiator, device_id, body, False).addCallback(fired)
    advance()
    for device_id in set(targets):
        protocol, transport = connections[device_id]
        data, device_side = transport.value(), b""
        transport.clear()
        for frame in reader.feed(data):
            publish = codec.decode(frame, 4)
            request_id = publish.topic.rsplit("/", 1)[1]
            device_side += codec.encode_puback(publish.packet_id, 4) + codec.encode_publish(
                "v1/devices/me/rpc/response/" + request_id, publish.payload, 1, 7, 4)
        protocol.dataReceived(device_side)
    advance()
    advance()


for r in range(50):
    one_round(r)
gc.collect()
started, before = time.process_time(), answered[0]
for r in range(ROUNDS):
    one_round(r)
print(1e6 * (time.process_time() - started) / (answered[0] - before))
'''


def sample(tree: Path, rounds: int, clock: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", SAMPLE, str(rounds), clock], env=env, capture_output=True, text=True,
                         cwd="/", check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="also a tree to compare with, samples alternating")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200, help="rounds of 64 commands per sample")
    parser.add_argument("--clock", choices=("reactor", "task"), default="reactor",
                        help="timed calls on the real (epoll) reactor, run by hand (default), or on a task.Clock, "
                             "whose callLater sorts all pending calls (as in this bench's first numbers)")
    args = parser.parse_args()
    trees = {"this tree": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    results: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.samples):
        for name, tree in trees.items():
            results[name].append(sample(tree, args.rounds, args.clock))
    for name, values in results.items():
        print(f"{name:10}: µs of CPU per command: min {min(values):.1f}, median {statistics.median(values):.1f}  "
              f"({', '.join(f'{v:.1f}' for v in values)})")
    if args.baseline:
        pairs = [a / b for a, b in zip(results["this tree"], results["baseline"])]
        print(f"this tree / baseline: min-to-min {min(results['this tree']) / min(results['baseline']):.3f}, "
              f"paired median {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
