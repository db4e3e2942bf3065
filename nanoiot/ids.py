"""Random (version 4) UUIDs without a system call each.

``uuid.uuid4()`` reads 16 bytes with ``os.urandom`` every time: a ``getrandom`` system call per REST RPC and per
device actor, 3-4 % of a REST RPC's CPU in the profile. Reading the kernel's randomness 4 KiB at a time gives the
same UUIDs (cryptographically random, RFC 4122 version 4) for a slice of a buffer.
"""

from __future__ import annotations

import os
from uuid import UUID

_POOL_BYTES = 4096
_pool = b""
_offset = _POOL_BYTES
# Version 4 and the RFC 4122 variant, as uuid.UUID(version=4) sets them.
_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_SET = (0x8000 << 48) | (4 << 76)


def uuid4() -> UUID:
    global _pool, _offset
    if _offset >= _POOL_BYTES:
        _pool = os.urandom(_POOL_BYTES)
        _offset = 0
    chunk = _pool[_offset:_offset + 16]
    _offset += 16
    return UUID(int=(int.from_bytes(chunk, "big") & _CLEAR) | _SET)
