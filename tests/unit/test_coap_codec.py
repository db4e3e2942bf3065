"""The CoAP codec: coapthon's serializer behind one declared error, binary payloads intact."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nanoiot.transports.coap import codec
from nanoiot.transports.coap.codec import CoapBadOption, CoapDecodeError, CoapEncodeError

RPC_PATH = [(codec.URI_PATH, segment) for segment in ("api", "v1", "A1_TEST_TOKEN", "rpc")]


def test_a_request_round_trips_with_its_type_code_mid_token_options_and_payload():
    message = codec.build(codec.CON, codec.POST, 0xBEEF, b"\x01\x02", RPC_PATH + [(codec.CONTENT_FORMAT, 50)],
                          b'{"method":"getCurrentTime"}')
    decoded = codec.decode(codec.encode(message), ("127.0.0.1", 5683))
    assert (decoded.type, decoded.code, decoded.mid, decoded.token) == (codec.CON, codec.POST, 0xBEEF, b"\x01\x02")
    assert codec.uri_path(decoded) == ("api", "v1", "A1_TEST_TOKEN", "rpc")
    assert codec.option_value(decoded, codec.CONTENT_FORMAT) == 50
    assert decoded.payload == b'{"method":"getCurrentTime"}'


def test_a_binary_payload_without_a_content_format_survives_decoding():
    payload = bytes(range(256)) + b"\xff\xfe\x80"
    message = codec.build(codec.NON, codec.POST, 1, b"", RPC_PATH, payload)
    assert codec.decode(codec.encode(message)).payload == payload


def test_observe_numbers_up_to_24_bits_and_block_options_round_trip():
    message = codec.build(codec.ACK, codec.CONTENT, 7, b"z", [
        (codec.OBSERVE, (1 << 24) - 1), (codec.BLOCK2, codec.block_option(1000, True, 6)), (codec.ETAG, b"\0\1"),
        (codec.SIZE2, 70000)], b"x")
    decoded = codec.decode(codec.encode(message))
    assert codec.observe_value(decoded) == (1 << 24) - 1
    assert codec.block_value(decoded, codec.BLOCK2) == (1000, True, 6)
    assert codec.option_value(decoded, codec.ETAG) == b"\0\1"
    assert codec.option_value(decoded, codec.SIZE2) == 70000


def test_an_observe_option_of_zero_length_reads_as_zero():
    data = codec.encode(codec.build(codec.CON, codec.GET, 1, b"t", RPC_PATH + [(codec.OBSERVE, 0)]))
    assert codec.observe_value(codec.decode(data)) == 0


def test_empty_ack_rst_and_ping_are_four_bytes_and_decode_as_empty():
    for mtype in (codec.CON, codec.ACK, codec.RST):
        data = codec.empty(mtype, 0x1234)
        assert len(data) == 4
        decoded = codec.decode(data)
        assert (decoded.type, decoded.code, decoded.mid, decoded.token) == (mtype, codec.EMPTY, 0x1234, None)


def test_codes_coapthon_does_not_know_such_as_4_01_encode_and_decode():
    decoded = codec.decode(codec.encode(codec.build(codec.ACK, codec.UNAUTHORIZED, 9, b"t")))
    assert codec.code_text(decoded.code) == "4.01"


def test_coapthons_server_killer_datagram_is_a_declared_error_with_the_header_fields():
    # A repeated Observe option: TypeError escaped coapthon's listen() loop and stopped its server (B1).
    with pytest.raises(CoapDecodeError) as caught:
        codec.decode(bytes.fromhex("4101000709600474656d70"))
    assert (caught.value.mtype, caught.value.mid) == (codec.CON, 7)


@pytest.mark.parametrize("data, why", [
    (b"", "empty datagram"),
    (b"\x40\x01\x00", "shorter than a header"),
    (bytes.fromhex("80010001"), "version 2"),
    (bytes.fromhex("49010001") + b"123456789", "token length 9"),
    (bytes.fromhex("42010001") + b"a", "token runs past the end"),
    (bytes.fromhex("40010001f0"), "option delta nibble 15"),
    (bytes.fromhex("40010001bf"), "option length nibble 15"),
    (bytes.fromhex("40010001b5617069"), "option value runs past the end"),
    (bytes.fromhex("40010001d0"), "extended delta missing"),
    (bytes.fromhex("40010001ff"), "payload marker with nothing after it"),
    (bytes.fromhex("41000001aa"), "empty message with a token"),
    (bytes.fromhex("40200001"), "reserved code class 1"),
    (bytes.fromhex("40e00001"), "reserved code class 7"),
    (bytes.fromhex("40010001b3ff6169") , "invalid UTF-8 in Uri-Path"),
])
def test_each_malformed_datagram_raises_the_declared_error(data, why):
    with pytest.raises(CoapDecodeError):
        codec.decode(data)


def test_an_unknown_critical_option_in_a_request_is_a_bad_option_error_carrying_the_token():
    header = bytes.fromhex("42010005") + b"tk"
    option_9 = bytes([0x90])  # option 9: unassigned and odd, so critical; zero-length
    codec.decode(header)  # the well-formed prefix alone decodes
    with pytest.raises(CoapBadOption) as caught:
        codec.decode(header + option_9)
    assert (caught.value.token, caught.value.option, caught.value.mid, caught.value.mtype) == (b"tk", 9, 5, codec.CON)


def test_an_unknown_elective_option_is_skipped():
    header = bytes.fromhex("40010005")
    option_2048 = bytes([0xE0, (2048 - 269) >> 8, (2048 - 269) & 0xFF])  # even: elective
    decoded = codec.decode(header + option_2048 + b"\xffhi")
    assert decoded.payload == b"hi"


def test_encoding_refuses_a_token_longer_than_eight_bytes():
    message = codec.build(codec.CON, codec.GET, 1, b"123456789")
    with pytest.raises(CoapEncodeError):
        codec.encode(message)


# --- fuzzing: only the declared error may come out -------------------------------------------------------------------

_VALID = [
    codec.encode(codec.build(codec.CON, codec.GET, 1, b"tok", RPC_PATH + [(codec.OBSERVE, 0)])),
    codec.encode(codec.build(codec.CON, codec.POST, 2, b"t", RPC_PATH + [(codec.URI_PATH, "5")], b'{"a":1}')),
    codec.encode(codec.build(codec.ACK, codec.CONTENT, 3, b"t", [(codec.OBSERVE, 77), (codec.CONTENT_FORMAT, 50),
                                                                  (codec.BLOCK2, 14), (codec.ETAG, b"\1\2\3")], b"x")),
]


def _decodes_or_declares(data: bytes) -> None:
    try:
        message = codec.decode(data, ("192.0.2.1", 1))
    except CoapDecodeError:
        return
    assert isinstance(message.payload, bytes)
    assert codec.is_request(message.code) or codec.is_response(message.code) or message.code == codec.EMPTY


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=96))
@example(bytes.fromhex("4101000709600474656d70"))
def test_fuzz_arbitrary_bytes_decode_or_raise_only_the_declared_error(data):
    _decodes_or_declares(data)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[position]
        else:
            del data[position:]
    return bytes(data)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_valid_datagrams_decode_or_raise_only_the_declared_error(data):
    _decodes_or_declares(data)


@settings(max_examples=500, deadline=None)
@given(
    mtype=st.sampled_from([codec.CON, codec.NON]),
    method=st.sampled_from([codec.GET, codec.POST, codec.PUT, codec.DELETE]),
    mid=st.integers(0, 0xFFFF),
    token=st.binary(max_size=8),
    path=st.lists(st.text(max_size=20), max_size=6),
    payload=st.binary(max_size=300),
)
def test_any_well_formed_request_round_trips(mtype, method, mid, token, path, payload):
    message = codec.build(mtype, method, mid, token, [(codec.URI_PATH, p) for p in path], payload)
    decoded = codec.decode(codec.encode(message))
    assert (decoded.type, decoded.code, decoded.mid) == (mtype, method, mid)
    assert (decoded.token or b"") == token
    assert codec.uri_path(decoded) == tuple(path)
    assert decoded.payload == payload
