"""``nanoiot.rpc.payload.loads`` reads a device's bytes exactly as ``json.loads`` does, fast path or not."""

import json

import pytest

from nanoiot.rpc.payload import loads

SAME = [
    b'{"method":"echo","params":{"i":1}}',
    b'{ "a" : [1, 2.5, null, true] }',
    b'{"s":"\xc3\xa9\xe2\x82\xac"}',           # UTF-8 text
    b'{"lone":"\\ud800"}',                     # an escaped lone surrogate
    b'{"raw":"\xed\xa0\x80"}',                 # a raw surrogate (surrogatepass, as json.loads)
    b"[1,2]", b"5", b'"text"', b"null",        # not objects: json.loads itself
    b"\xef\xbb\xbf{}",                         # a UTF-8 BOM
    '{"u":"16"}'.encode("utf-16"),             # UTF-16 with its BOM
    '{"u":"16"}'.encode("utf-16-le"),          # UTF-16 without: a zero second byte
]


@pytest.mark.parametrize("payload", SAME)
def test_the_value_is_json_loads_value(payload: bytes) -> None:
    assert loads(payload) == json.loads(payload)


@pytest.mark.parametrize("payload", [b"{", b'{"a":}', b"{\xff}", b"", b"{}x", b"not json"])
def test_what_json_loads_refuses_is_refused_with_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(payload)
    with pytest.raises(ValueError) as got:
        loads(payload)
    assert type(got.value) is type(expected.value)
