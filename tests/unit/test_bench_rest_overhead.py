"""bench/rest_overhead.py's floor target: the least server that does a two-way RPC's HTTP request and MQTT round
trip must really do it (else the benchmark would measure a server that answers nothing). In memory: the floor's
site and MQTT factory on StringTransports, the device's packets from NanoIoT's own codec."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from bench.rest_overhead import bench_jwt, floor_site, floors
from nanoiot.transports.mqtt import codec

DEVICE_ID = "7f0b3c1e-2d4a-4b5c-8d6e-0f1a2b3c4d5e"
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Transport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def connect(factory: Any) -> tuple[Any, Transport]:
    protocol = factory.buildProtocol(PEER)
    transport = Transport()
    protocol.makeConnection(transport)
    return protocol, transport


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def frames(data: bytes) -> list[Any]:
    return [codec.decode(frame, 4) for frame in codec.FrameReader(1 << 20).feed(data)]


def post(channel: Any, device_id: str, body: bytes, token: str) -> None:
    channel.dataReceived(b"POST /api/rpc/twoway/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"X-Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (device_id.encode(), token.encode(), len(body), body))


@pytest.mark.parametrize("variant", ["floor", "floor+flush+jwt"])
def test_the_floor_publishes_the_command_to_the_device_and_answers_with_its_answer(variant: str) -> None:
    site, mqtt = floor_site(variant, {b"token-1": DEVICE_ID.encode()})
    site.reactor = task.Clock()
    device, device_wire = connect(mqtt)
    assert device_wire.no_delay
    device.dataReceived(codec.encode_connect("", protocol_level=4, username="token-1", keep_alive=300)
                        + codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4) + b"\xc0\x00")
    assert take(device_wire) == codec.encode_connack(False, 0, 4) + codec.encode_suback(1, [1], 4) + b"\xd0\x00"

    http, http_wire = connect(site)
    for i in (1, 2):
        post(http, DEVICE_ID, b'{"method":"echo","params":{"i":%d}}' % i, bench_jwt())
        (command,) = frames(take(device_wire))
        assert (command.topic, command.qos, command.packet_id) == (f"v1/devices/me/rpc/request/{i}", 1, i)
        assert command.payload == b'{"method":"echo","params":{"i":%d}}' % i
        assert http_wire.value() == b""  # waiting for the device
        answer = b'{"echoed":%d}' % i
        # The device's PUBACK and its answer, the answer split across two reads.
        packets = codec.encode_puback(i, 4) + codec.encode_publish(f"v1/devices/me/rpc/response/{i}", answer, 1,
                                                                   i + 1, 4)
        device.dataReceived(packets[:7])
        device.dataReceived(packets[7:])
        assert take(device_wire) == codec.encode_puback(i + 1, 4)
        response = take(http_wire)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nContent-Type: application/json\r\n" in response
        assert b"\r\nContent-Length: %d\r\n" % len(answer) in response
        assert response.endswith(b"\r\n\r\n" + answer)


def test_a_device_with_an_unknown_token_is_refused_and_its_commands_are_504() -> None:
    site, mqtt = floor_site("floor", {b"token-1": DEVICE_ID.encode()})
    site.reactor = task.Clock()
    device, device_wire = connect(mqtt)
    device.dataReceived(codec.encode_connect("", protocol_level=4, username="nope", keep_alive=300))
    assert take(device_wire) == codec.encode_connack(False, 5, 4) and device_wire.disconnecting
    http, http_wire = connect(site)
    post(http, DEVICE_ID, b'{"method":"echo","params":{}}', "x")
    response = take(http_wire)
    assert response.startswith(b"HTTP/1.1 504 ") and response.endswith(b'{"message":"Device is offline"}')


def test_floor_jwt_refuses_a_token_not_signed_with_the_key() -> None:
    site, _ = floor_site("floor+jwt", {})
    site.reactor = task.Clock()
    http, http_wire = connect(site)
    post(http, DEVICE_ID, b'{"method":"echo","params":{}}', bench_jwt()[:-4] + "AAAA")
    response = take(http_wire)
    assert response.startswith(b"HTTP/1.1 401 ") and response.endswith(b'{"message":"Invalid JWT token"}')


def test_floors_names_the_known_variants() -> None:
    assert floors("floor, floor+flush+jwt") == ["floor", "floor+flush+jwt"]
    assert floors("") == []
    with pytest.raises(argparse.ArgumentTypeError, match="unknown floor target"):
        floors("floor,floor+nope")
