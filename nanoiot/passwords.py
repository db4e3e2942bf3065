"""bcrypt password hashing, always off the reactor thread (a check costs tens of milliseconds by design)."""

from __future__ import annotations

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

#: bcrypt's work factor; 10 keeps a login near 50 ms on a small machine while staying well above brute-force speed.
ROUNDS = 10


def _secret(password: str) -> bytes:
    """bcrypt reads the first 72 bytes (newer releases refuse longer input instead of truncating it)."""
    return password.encode("utf-8", "surrogatepass")[:72]


def hash_password_sync(password: str) -> bytes:
    return bcrypt.hashpw(_secret(password), bcrypt.gensalt(ROUNDS))


def hash_password(password: str) -> Deferred:
    return deferToThread(hash_password_sync, password)


def _check(password: str, password_hash: bytes) -> bool:
    try:
        return bcrypt.checkpw(_secret(password), password_hash)
    except ValueError:  # a malformed stored hash (a user not activated yet) never authenticates, in the same time
        bcrypt.checkpw(_secret(password), DUMMY_HASH)
        return False


def check_password(password: str, password_hash: bytes) -> Deferred:
    return deferToThread(_check, password, password_hash)


#: A bcrypt hash (of a random text, at :data:`ROUNDS`) that no password matches: checked when a login names no
#: existing user, so that such a login takes as long as one with a wrong password (the time tells nothing).
DUMMY_HASH = b"$2b$10$Pr2474gkefdGtDYbeSGI5OtmtHJ4U5rncj6F6KHIjzY9zklcyp/jS"


def check_password_or_dummy(password: str, password_hash: bytes | None) -> Deferred:
    """:func:`check_password` against ``password_hash``, or against :data:`DUMMY_HASH` (always False) when there is
    none: the same bcrypt work either way."""
    if password_hash is None:
        return deferToThread(_check_dummy, password)
    return check_password(password, password_hash)


def _check_dummy(password: str) -> bool:
    _check(password, DUMMY_HASH)
    return False
