"""Random (version 4) UUIDs without a system call each.

``uuid.uuid4()`` reads 16 bytes with ``os.urandom`` every time: a ``getrandom`` system call per REST RPC and per
device actor, 3-4 % of a REST RPC's CPU in the profile. Reading the kernel's randomness 4 KiB at a time gives the
same UUIDs (cryptographically random, RFC 4122 version 4) for a slice of a buffer.
"""

from __future__ import annotations

import os
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


def uuid4() -> UUID:
    global _pool, _offset
    if _offset >= _POOL_BYTES:
        _pool = os.urandom(_POOL_BYTES)
        _offset = 0
    chunk = _pool[_offset:_offset + 16]
    _offset += 16
    value = _new(UUID)
    _set(value, "int", (int.from_bytes(chunk, "big") & _CLEAR) | _SET)
    _set(value, "is_safe", _UNKNOWN)
    return value
