"""CoAP (RFC 7252) datagrams <-> coapthon3 message objects, with exactly one declared error.

Pure: no I/O, no clock. ``decode`` raises :class:`CoapDecodeError` (or its subclass :class:`CoapBadOption`) for any
datagram it cannot turn into a message, whatever went wrong inside; ``encode`` raises :class:`CoapEncodeError`.

How coapthon3 is used, and why (docs: /work/shared/spec/protocols.md §1.2, §1.4):

* ``_frame`` is our own small framing check: header, token length, code class, every option's delta/length
  nibbles and bounds, and where the payload starts. It is what makes the error space closed: coapthon's own parser
  returns an int for some errors, raises ``IndexError``/``TypeError`` for others (B1) and logs a warning for every
  unknown elective option.
* coapthon's ``Serializer.deserialize`` then parses the header and options **without the payload** (the bytes
  before the 0xFF marker), inside a ``try/except Exception``. Its answer "400" (an int) becomes an error too.
* The payload is cut from the raw datagram by us and kept as ``bytes``: coapthon decodes payloads as UTF-8 unless
  the Content-Format is octet-stream, EXI or CBOR, and refuses binary ones (B6).
* ``Serializer.serialize`` encodes (it returns a ctypes buffer: ``.raw``); empty ACK/RST are packed directly.
  Two coapthon bugs are worked around here: a zero-length string option decodes as the text ``"b''"``, and a
  non-ASCII string option is encoded with its length in characters instead of bytes (``build`` uses ``_Option``).
* coapthon's code table lacks 4.01 Unauthorized, 4.02 Bad Option, 4.15, 4.29 and FETCH/PATCH/iPATCH (its code
  setter refuses them): they are added to ``coapthon.defines.Codes.LIST`` once, at import (additive only).
* A request with an unrecognised critical option raises :class:`CoapBadOption` so the server can answer 4.02.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Iterable

from coapthon import defines
from coapthon.messages.message import Message
from coapthon.messages.option import Option
from coapthon.messages.request import Request
from coapthon.messages.response import Response
from coapthon.serializer import Serializer

# coapthon logs a warning per unknown elective option and an exception per failed pack: one datagram must never be
# able to write a line of its own (our server logs garbage datagrams itself, rate-limited).
logging.getLogger("coapthon.serializer").setLevel(logging.CRITICAL)

# --- message types and codes ----------------------------------------------------------------------------------------

CON, NON, ACK, RST = 0, 1, 2, 3
TYPE_NAMES = {CON: "CON", NON: "NON", ACK: "ACK", RST: "RST"}


def code(cls: int, detail: int) -> int:
    return (cls << 5) | detail


EMPTY = 0
GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
CREATED = code(2, 1)
DELETED = code(2, 2)
VALID = code(2, 3)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
CONTINUE = code(2, 31)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
INTERNAL_SERVER_ERROR = code(5, 0)
SERVICE_UNAVAILABLE = code(5, 3)

_MISSING_CODES = {
    FETCH: "FETCH", PATCH: "PATCH", IPATCH: "iPATCH", UNAUTHORIZED: "UNAUTHORIZED", BAD_OPTION: "BAD_OPTION",
    code(4, 15): "UNSUPPORTED_CONTENT_FORMAT", code(4, 29): "TOO_MANY_REQUESTS",
}
for _number, _name in _MISSING_CODES.items():
    defines.Codes.LIST.setdefault(_number, defines.CodeItem(_number, _name))

# --- options --------------------------------------------------------------------------------------------------------

IF_MATCH = 1
URI_HOST = 3
ETAG = 4
OBSERVE = 6
URI_PORT = 7
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
SIZE1 = 60

JSON_FORMAT = 50
PAYLOAD_MARKER = 0xFF
MAX_TOKEN_LENGTH = 8

#: Options coapthon knows how to parse; any other *critical* (odd) option makes a request unprocessable (4.02).
KNOWN_OPTIONS = frozenset(defines.OptionRegistry.LIST)


def code_text(number: int | None) -> str:
    number = number or 0
    return f"{number >> 5}.{number & 31:02d}"


def is_request(number: int | None) -> bool:
    return number is not None and 1 <= number <= 31


def is_response(number: int | None) -> bool:
    return number is not None and 64 <= number <= 191


# --- errors ---------------------------------------------------------------------------------------------------------


class CoapDecodeError(ValueError):
    """The datagram is not a CoAP message we can process.

    When the fixed 4-byte header was readable, ``mtype`` and ``mid`` tell the caller enough to reject a CON with an
    RST (RFC 7252 §4.2); otherwise they are None.
    """

    def __init__(self, reason: str, mtype: int | None = None, mid: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mtype = mtype
        self.mid = mid


class CoapBadOption(CoapDecodeError):
    """A well-framed request carrying an unrecognised critical option: answer 4.02 Bad Option (RFC 7252 §5.4.1)."""

    def __init__(self, reason: str, mtype: int, mid: int, token: bytes, option: int) -> None:
        super().__init__(reason, mtype, mid)
        self.token = token
        self.option = option


class CoapEncodeError(ValueError):
    """A message object that cannot be serialised (a bug on our side, never the peer's)."""


# --- decode ---------------------------------------------------------------------------------------------------------


_STRING_OPTIONS = frozenset(n for n, item in defines.OptionRegistry.LIST.items() if item.value_type == defines.STRING)


def _frame(data: bytes, empty_strings: list[bool]) -> tuple[int, int, int, int, int | None, int | None]:
    """Check the framing; returns (type, token length, code, mid, payload start or None, bad critical option).

    ``empty_strings`` receives, for every string-valued option in wire order, whether it has zero length.
    """
    if len(data) < 4:
        raise CoapDecodeError(f"{len(data)} bytes: shorter than a CoAP header")
    first, message_code, mid = struct.unpack_from("!BBH", data)
    version, mtype, tkl = first >> 6, (first >> 4) & 3, first & 15
    if version != 1:
        raise CoapDecodeError(f"version {version}")
    if tkl > MAX_TOKEN_LENGTH:
        raise CoapDecodeError(f"token length {tkl}", mtype, mid)
    if message_code >> 5 in (1, 6, 7):
        raise CoapDecodeError(f"reserved code class {code_text(message_code)}", mtype, mid)
    if message_code == EMPTY:
        if len(data) != 4 or tkl:
            raise CoapDecodeError("empty message with a token or options", mtype, mid)
        return mtype, 0, EMPTY, mid, None, None
    pos = 4 + tkl
    if pos > len(data):
        raise CoapDecodeError("token runs past the end", mtype, mid)
    number = 0
    bad_critical: int | None = None
    end = len(data)
    while pos < end:
        byte = data[pos]
        pos += 1
        if byte == PAYLOAD_MARKER:
            if pos >= end:
                raise CoapDecodeError("payload marker with an empty payload", mtype, mid)
            return mtype, tkl, message_code, mid, pos, bad_critical
        delta, length = byte >> 4, byte & 15
        if delta == 15 or length == 15:
            raise CoapDecodeError("reserved option nibble 15", mtype, mid)
        values = []
        for nibble in (delta, length):
            if nibble == 13:
                if pos + 1 > end:
                    raise CoapDecodeError("option header runs past the end", mtype, mid)
                values.append(data[pos] + 13)
                pos += 1
            elif nibble == 14:
                if pos + 2 > end:
                    raise CoapDecodeError("option header runs past the end", mtype, mid)
                values.append(((data[pos] << 8) | data[pos + 1]) + 269)
                pos += 2
            else:
                values.append(nibble)
        number += values[0]
        pos += values[1]
        if pos > end:
            raise CoapDecodeError(f"option {number} runs past the end", mtype, mid)
        if number not in KNOWN_OPTIONS and number & 1 and bad_critical is None:
            bad_critical = number
        if number in _STRING_OPTIONS:
            empty_strings.append(values[1] == 0)
    return mtype, tkl, message_code, mid, None, bad_critical


def decode(data: bytes, source: tuple[str, int] = ("0.0.0.0", 0)) -> Message:
    """One datagram -> a coapthon ``Request``, ``Response`` or (empty) ``Message``; ``payload`` is always bytes."""
    try:
        data = bytes(data)
        empty_strings: list[bool] = []
        mtype, tkl, message_code, mid, payload_start, bad_critical = _frame(data, empty_strings)
    except CoapDecodeError:
        raise
    except Exception as exc:  # pragma: no cover - _frame only raises CoapDecodeError; belt and braces
        raise CoapDecodeError(f"unframeable: {type(exc).__name__}") from None
    if bad_critical is not None:
        if is_request(message_code) and mtype in (CON, NON):
            raise CoapBadOption(f"unrecognised critical option {bad_critical}", mtype, mid,
                                data[4:4 + tkl], bad_critical)
        raise CoapDecodeError(f"unrecognised critical option {bad_critical}", mtype, mid)
    head = data if payload_start is None else data[:payload_start - 1]
    try:
        message = Serializer.deserialize(head, (str(source[0]), int(source[1])))
    except Exception as exc:  # coapthon leaks TypeError (repeated options), IndexError, ...
        raise CoapDecodeError(f"unparseable options: {type(exc).__name__}", mtype, mid) from None
    if not isinstance(message, Message):
        raise CoapDecodeError("unparseable options (invalid UTF-8 or option value)", mtype, mid)
    if message.code is None:
        message.code = EMPTY
    if any(empty_strings):
        # coapthon turns a zero-length string option into the text "b''" (str(bytes())): make it "".
        strings = [option for option in message.options if option.number in _STRING_OPTIONS]
        for option, is_empty in zip(strings, empty_strings):
            if is_empty:
                option._value = ""
    message.payload = b"" if payload_start is None else data[payload_start:]
    return message


# --- encode ---------------------------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    # coapthon would OR a 9+ byte token length into the type bits, and pack a MID > 16 bits as garbage.
    if message.token is not None and len(message.token) > MAX_TOKEN_LENGTH:
        raise CoapEncodeError(f"token of {len(message.token)} bytes")
    if message.type not in (CON, NON, ACK, RST):
        raise CoapEncodeError(f"message type {message.type!r}")
    if message.mid is not None and not 0 <= message.mid <= 0xFFFF:
        raise CoapEncodeError(f"message id {message.mid!r}")
    if message.code == EMPTY and not message.token and not message.options and not message.payload:
        return empty(message.type, message.mid)
    try:
        buffer = Serializer.serialize(message)
    except Exception as exc:
        raise CoapEncodeError(f"cannot serialise: {type(exc).__name__}: {exc}") from None
    if buffer is None:
        raise CoapEncodeError("cannot serialise: struct packing failed")
    return buffer.raw


def empty(mtype: int, mid: int) -> bytes:
    """An Empty message (ACK, RST, or a CON ping): just the 4-byte header."""
    return struct.pack("!BBH", 0x40 | (mtype << 4), EMPTY, mid & 0xFFFF)


class _Option(Option):
    """coapthon's Option measures a string value in characters; the wire needs its UTF-8 bytes."""

    @property
    def length(self) -> int:
        value = self._value
        if isinstance(value, str):
            return len(value.encode("utf-8"))
        return Option.length.fget(self)  # type: ignore[attr-defined]


def build(
    mtype: int | None,
    message_code: int,
    mid: int | None = None,
    token: bytes | None = None,
    options: Iterable[tuple[int, Any]] = (),
    payload: bytes = b"",
) -> Message:
    """A message object, options given as (number, value); values are ints, str (Uri-Path...) or bytes (ETag)."""
    message: Message = Request() if is_request(message_code) else Response() if is_response(message_code) else Message()
    message.type = mtype
    message.code = message_code
    if mid is not None:
        message.mid = mid
    message.token = token or None
    for number, value in options:
        option = _Option()
        option.number = number
        option.value = value
        message.add_option(option)
    message.payload = payload
    return message


# --- option helpers -------------------------------------------------------------------------------------------------


def option_values(message: Message, number: int) -> list[Any]:
    return [option.value for option in message.options if option.number == number]


def option_value(message: Message, number: int, default: Any = None) -> Any:
    for option in message.options:
        if option.number == number:
            return option.value
    return default


def uri_path(message: Message) -> tuple[str, ...]:
    """The Uri-Path segments, in order (an empty segment stays an empty string)."""
    return tuple(str(value) if value is not None else "" for value in option_values(message, URI_PATH))


def observe_value(message: Message) -> int | None:
    value = option_value(message, OBSERVE)
    if value is None:
        return None
    return int(value or 0)


def block_value(message: Message, number: int) -> tuple[int, bool, int] | None:
    """Block1/Block2 as (num, more, szx); None when absent."""
    value = option_value(message, number)
    if value is None:
        return None
    value = int(value or 0)
    return value >> 4, bool(value & 8), value & 7


def block_option(num: int, more: bool, szx: int) -> int:
    return (num << 4) | (8 if more else 0) | szx


def szx_size(szx: int) -> int:
    return 1 << (szx + 4)


def describe(message: Message) -> str:
    return (f"{TYPE_NAMES.get(message.type, message.type)} {code_text(message.code)} mid={message.mid} "
            f"token={(message.token or b'').hex()}")
