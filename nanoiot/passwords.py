"""bcrypt password hashing, always off the reactor thread (a check costs tens of milliseconds by design)."""

from __future__ import annotations

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

#: bcrypt's work factor; 10 keeps a login near 50 ms on a small machine while staying well above brute-force speed.
ROUNDS = 10


def hash_password_sync(password: str) -> bytes:
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(ROUNDS))


def hash_password(password: str) -> Deferred:
    return deferToThread(hash_password_sync, password)


def _check(password: str, password_hash: bytes) -> bool:
    try:
        return bcrypt.checkpw(password.encode("utf-8"), password_hash)
    except ValueError:  # a malformed stored hash never authenticates
        return False


def check_password(password: str, password_hash: bytes) -> Deferred:
    return deferToThread(_check, password, password_hash)
