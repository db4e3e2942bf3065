"""Block-wise transfers (RFC 7959) for payloads larger than one datagram.

* **Block2** (server -> device): a response or notification whose payload exceeds the block size carries block 0
  with ``Block2``, ``Size2`` and an ``ETag``; the representation is kept in :class:`Block2Store`, keyed by the
  requester's endpoint, method and Uri-Path (the follow-up requests use new tokens), until its last block has been
  served or it has not been asked for during ``lifetime``. For an Observe notification only the first block is
  sent; the device fetches the rest with GETs without Observe (§3.4 of RFC 7959).
* **Block1** (device -> server): :class:`Block1Assembler` reassembles request bodies per (endpoint, method, path),
  answers 2.31 Continue per block, 4.13 (with Size1) above the size cap, and 4.08 for a block that does not follow
  what it has (out of order, or state timed out after ``lifetime``).

Pure state against a clock reading given by the caller; expiry runs through the shared :class:`Sweeper`.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from nanoiot.transports.coap.codec import szx_size
from nanoiot.transports.coap.messages import ExpiringMap, Sweeper

#: Largest block on UDP (szx 7 is BERT, TCP only): 1024 bytes.
MAX_SZX = 6
#: How long a partial transfer (either direction) is kept without activity.
BLOCK_LIFETIME = 60.0
MAX_TRANSFERS = 10_000


def clamp_szx(szx: int) -> int:
    return min(max(szx, 0), MAX_SZX)


def split(payload: bytes, num: int, szx: int) -> tuple[bytes, bool] | None:
    """Block ``num`` of ``payload`` at block size ``szx``: (chunk, more), or None past the end."""
    size = szx_size(szx)
    start = num * size
    if start >= len(payload) and not (start == 0 and not payload):
        return None
    chunk = payload[start:start + size]
    return chunk, start + size < len(payload)


@dataclass(slots=True)
class Representation:
    payload: bytes
    etag: bytes
    #: The response code and Content-Format every block is sent with.
    code: int
    content_format: int | None = None
    #: Called once with True when the last block was served, False when it expired or was evicted unfinished.
    on_done: Callable[[bool], None] | None = None


class Block2Store:
    def __init__(self, sweeper: Sweeper, lifetime: float = BLOCK_LIFETIME, max_entries: int = MAX_TRANSFERS) -> None:
        self.entries = sweeper.register(ExpiringMap(lifetime, max_entries, on_expire=self._expired))
        self._etags = itertools.count(1)

    def __len__(self) -> int:
        return len(self.entries)

    def new_etag(self) -> bytes:
        return struct.pack("!I", next(self._etags) & 0xFFFFFFFF)

    def put(self, key: Hashable, payload: bytes, now: float, code: int, content_format: int | None = None,
            on_done: Callable[[bool], None] | None = None, etag: bytes | None = None) -> Representation:
        previous = self.entries.pop(key)
        if previous is not None and previous.on_done is not None:
            previous.on_done(False)
        representation = Representation(payload, etag or self.new_etag(), code, content_format, on_done)
        self.entries.put(key, representation, now)
        return representation

    def get(self, key: Hashable, now: float) -> Representation | None:
        return self.entries.get(key, now)

    def served(self, key: Hashable, representation: Representation, more: bool, now: float) -> None:
        """A block went out: keep it for the next request, or finish it after the last block."""
        if more:
            self.entries.put(key, representation, now)  # refresh its life
            return
        if self.entries.get(key, now) is representation:
            self.entries.pop(key)
        if representation.on_done is not None:
            done, representation.on_done = representation.on_done, None
            done(True)

    def discard(self, key: Hashable) -> None:
        """Drop without calling back (its owner is gone)."""
        self.entries.pop(key)

    @staticmethod
    def _expired(key: Hashable, representation: Any) -> None:
        if representation.on_done is not None:
            done, representation.on_done = representation.on_done, None
            done(False)


class Block1Status(enum.Enum):
    CONTINUE = "continue"  # 2.31, more blocks expected
    COMPLETE = "complete"  # the whole body is here
    TOO_LARGE = "too_large"  # 4.13
    INCOMPLETE = "incomplete"  # 4.08
    BAD = "bad"  # 4.00: a block of the wrong size


class Block1Assembler:
    def __init__(self, sweeper: Sweeper, max_size: int, lifetime: float = BLOCK_LIFETIME,
                 max_transfers: int = MAX_TRANSFERS) -> None:
        self.max_size = max_size
        self.buffers = sweeper.register(ExpiringMap(lifetime, max_transfers))

    def __len__(self) -> int:
        return len(self.buffers)

    def feed(self, key: Hashable, block: tuple[int, bool, int], payload: bytes, size1: int | None,
             now: float) -> tuple[Block1Status, bytes]:
        num, more, szx = block
        if szx > MAX_SZX:
            self.buffers.pop(key)
            return Block1Status.BAD, b""
        size = szx_size(szx)
        if more and len(payload) != size:
            self.buffers.pop(key)
            return Block1Status.BAD, b""
        if size1 is not None and size1 > self.max_size:
            self.buffers.pop(key)
            return Block1Status.TOO_LARGE, b""
        if num == 0:
            buffer = bytearray()
        else:
            buffer = self.buffers.get(key, now)
            if buffer is None or len(buffer) != num * size:
                self.buffers.pop(key)
                return Block1Status.INCOMPLETE, b""
        if len(buffer) + len(payload) > self.max_size:
            self.buffers.pop(key)
            return Block1Status.TOO_LARGE, b""
        buffer += payload
        if more:
            self.buffers.put(key, buffer, now)
            return Block1Status.CONTINUE, b""
        self.buffers.pop(key)
        return Block1Status.COMPLETE, bytes(buffer)
