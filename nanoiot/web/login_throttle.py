"""Login attempts limited per account and per source address, so that passwords cannot be guessed at speed.

Every attempt counts against both buckets when it is made (a refused one does not run bcrypt at all); a successful
login empties the account's bucket again, so that a user who finally typed the right password is not locked out by
their own mistakes. The address's bucket is never reset: it bounds how fast one address may try any accounts.
"""

from __future__ import annotations

from collections.abc import Callable

from nanoiot.errors import TooManyRequests
from nanoiot.limits import KeyedLimiter, Rate

TOO_MANY_ATTEMPTS = "Too many login attempts: try again later"


class LoginThrottle:
    def __init__(self, per_account: tuple[Rate, ...], per_address: tuple[Rate, ...],
                 clock: Callable[[], float]) -> None:
        self.accounts: KeyedLimiter[str] = KeyedLimiter(per_account, clock)
        self.addresses: KeyedLimiter[str] = KeyedLimiter(per_address, clock)

    def attempt(self, account: str, address: str) -> None:
        """Count one attempt; :class:`TooManyRequests` (429, with ``Retry-After``) when either bucket is empty."""
        wait = max(self.addresses.take(address), self.accounts.take(account.strip().lower()))
        if wait > 0:
            raise TooManyRequests(TOO_MANY_ATTEMPTS, retry_after=wait)

    def succeeded(self, account: str) -> None:
        self.accounts.forget(account.strip().lower())
