"""Random (version 4) and time-ordered (version 7) UUIDs without a system call each.

``uuid.uuid4()`` reads 16 bytes with ``os.urandom`` every time: a ``getrandom`` system call per REST RPC and per
device actor, 3-4 % of a REST RPC's CPU in the profile. Reading the kernel's randomness 4 KiB at a time gives the
same UUIDs (cryptographically random, RFC 4122 version 4) for a slice of a buffer.

RPC ids are version 7 (RFC 9562: 48 bits of Unix milliseconds, then 74 random bits): the ``rpc`` table's primary
key then grows at its end, as ThingsBoard's time-based ids do, instead of landing on a random page of the key's
index for every command. A batch of new commands dirties a few pages of that index instead of one per command,
which was most of what SQLite spent on a bulk command's insert besides the table itself (bench/throughput.py
--channels bulk). They stay unguessable (74 random bits) and are still plain UUIDs to every client.
"""

from __future__ import annotations

import os
import time
from uuid import UUID, SafeUUID

_POOL_BYTES = 4096
_pool = b""
_offset = _POOL_BYTES
# Version 4 and the RFC 4122 variant, as uuid.UUID(version=4) sets them.
_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_SET = (0x8000 << 48) | (4 << 76)
# UUID(int=...) is pure Python (range checks, keyword handling): 0.54 us; the two slots set directly, 0.21 us. The
# value is a valid 128-bit version-4 int by construction, and ``is_safe`` is what UUID(int=...) sets.
_new = object.__new__
_set = object.__setattr__
_UNKNOWN = SafeUUID.unknown


def _random_16() -> int:
    """16 random bytes of the pool, as an int."""
    global _pool, _offset
    if _offset >= _POOL_BYTES:
        _pool = os.urandom(_POOL_BYTES)
        _offset = 0
    chunk = _pool[_offset:_offset + 16]
    _offset += 16
    return int.from_bytes(chunk, "big")


def uuid4() -> UUID:
    value = _new(UUID)
    _set(value, "int", (_random_16() & _CLEAR) | _SET)
    _set(value, "is_safe", _UNKNOWN)
    return value


# Version 7 and the RFC 9562 variant over the low 80 random bits (12 of rand_a, 62 of rand_b; 6 bits are marks).
_CLEAR7 = (1 << 80) - 1 & ~((0xF << 76) | (0x3 << 62))
_SET7 = (7 << 76) | (0x2 << 62)


def uuid7(now_ns: int | None = None) -> UUID:
    """A time-ordered UUID of ``now_ns`` (``time.time_ns()`` by default): ids made later sort after, a millisecond
    apart or more (within one millisecond their order is random)."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    value = _new(UUID)
    _set(value, "int", ((ms & 0xFFFFFFFFFFFF) << 80) | (_random_16() & _CLEAR7) | _SET7)
    _set(value, "is_safe", _UNKNOWN)
    return value
