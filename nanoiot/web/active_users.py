"""Whether the user behind a verified token may still act.

A JWT stays valid until it expires; ThingsBoard still refuses the token of a user who was deleted or disabled since,
by checking the user on every request. Here what the database said about a user is kept in a small cache (one dict
lookup per request, no round trip), dropped the moment the user is deleted, disabled or changed — on this node by the
user API, on the others by a cluster notice — so that the next request looks again.

Tokens issued before a user was disabled (or deleted, or its password changed) stay refused even once the user is
enabled again, as ThingsBoard's "token outdating" does; that moment is kept in memory only (a restart forgets it, but
not the ``enabled`` flag, which the database keeps).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from inspect import iscoroutine
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.errors import AuthenticationFailed, NanoError, TokenExpired
from nanoiot.persistence.records import User
from nanoiot.web.tokens import Principal

log = Logger(namespace="nanoiot.web")

USER_NOT_FOUND = "User not found"
USER_NOT_ACTIVE = "User is not active"
TOKEN_OUTDATED = "Token is outdated"
#: Users remembered at most; the least recently used is dropped first (a miss only costs one query).
MAX_USERS = 100_000
#: Kind of the cluster notice telling the other nodes that a user changed.
NOTICE = "user-changed"


class ActiveUsers:
    """User id -> whether it may act (exists and is enabled), read through from ``lookup`` (the repository's
    ``get_user``); plus, per user, the time before which its tokens are outdated."""

    def __init__(self, lookup: Callable[[UUID], Deferred], max_users: int = MAX_USERS) -> None:
        self._lookup = lookup
        self.max_users = max_users
        #: user id -> None when deleted, else whether it is enabled.
        self._known: OrderedDict[UUID, bool | None] = OrderedDict()
        #: user id -> callers waiting for its lookup.
        self._pending: dict[UUID, list[Deferred]] = {}
        #: user id -> epoch ms: tokens issued before it are refused.
        self._outdated_before: dict[UUID, int] = {}
        #: Told (user id) after a user changed here or on another node (the WebSocket closes that user's sockets).
        self.listeners: list[Callable[[UUID], None]] = []
        #: Told the cluster notice to broadcast after a change made on this node (None on a single node).
        self.broadcast: Callable[[dict[str, Any]], None] | None = None

    # --- checks ---------------------------------------------------------------------------------------------------

    def admit(self, principal: Principal) -> Deferred | None:
        """None if the user may act (known already); raises :class:`AuthenticationFailed` if it may not; a Deferred
        (firing None or failing the same way) when the database must be asked first."""
        user_id = principal.user_id
        known = self._known
        state = known.get(user_id, _UNKNOWN)
        if state is not _UNKNOWN:  # on every REST request: one lookup of the (pure Python) UUID hash, not three
            known.move_to_end(user_id)
            if state is not True:
                _verdict(state)
            if self._outdated_before:
                self._check_issued(principal)
            return None
        waiter: Deferred = Deferred()
        waiters = self._pending.get(user_id)
        if waiters is not None:
            waiters.append(waiter)
        else:  # the waiter is in the list first: a lookup that answers at once still reaches it
            waiters = self._pending[user_id] = [waiter]
            self._lookup(user_id).addCallbacks(self._looked_up, self._lookup_failed, callbackArgs=(user_id, waiters),
                                               errbackArgs=(user_id, waiters))
        return waiter.addCallback(_verdict).addCallback(lambda _: self._check_issued(principal))

    def _check_issued(self, principal: Principal) -> None:
        outdated = self._outdated_before.get(principal.user_id)
        if outdated is not None and principal.issued_ms < outdated:
            raise TokenExpired(TOKEN_OUTDATED)

    def _looked_up(self, user: User | None, user_id: UUID, waiters: list[Deferred]) -> None:
        state = None if user is None else user.enabled
        # Remembered only if nothing changed the user while the query ran (_apply() drops the pending lookup).
        if self._pending.get(user_id) is waiters:
            del self._pending[user_id]
            self._known[user_id] = state
            while len(self._known) > self.max_users:
                self._known.popitem(last=False)
        for waiter in waiters:
            waiter.callback(state)

    def _lookup_failed(self, failure: Failure, user_id: UUID, waiters: list[Deferred]) -> None:
        if self._pending.get(user_id) is waiters:
            del self._pending[user_id]
        for waiter in waiters:
            waiter.errback(failure)

    # --- changes --------------------------------------------------------------------------------------------------

    def changed(self, user_id: UUID, revoke_before: int | None = None) -> None:
        """A user was deleted, disabled, enabled or got a new password on this node: forget it here, tell the
        listeners and the other nodes. ``revoke_before`` (epoch ms): its older tokens stop working."""
        self._apply(user_id, revoke_before)
        if self.broadcast is not None:
            self.broadcast({"t": NOTICE, "user": str(user_id), "before": revoke_before})

    def remote_change(self, envelope: dict[str, Any]) -> None:
        """Another node's :meth:`changed` notice."""
        try:
            user_id = UUID(str(envelope.get("user")))
            before = envelope.get("before")
            revoke_before = int(before) if before is not None else None
        except (TypeError, ValueError):
            log.warn("cluster: unreadable user-changed notice dropped: {envelope}", envelope=envelope)
            return
        self._apply(user_id, revoke_before)

    def _apply(self, user_id: UUID, revoke_before: int | None) -> None:
        self._known.pop(user_id, None)
        self._pending.pop(user_id, None)
        if revoke_before is not None:
            self._outdated_before[user_id] = max(revoke_before, self._outdated_before.get(user_id, 0))
        for listener in list(self.listeners):
            try:
                listener(user_id)
            except Exception:
                log.failure("a user-changed listener failed")


#: Not in ``ActiveUsers._known`` (None there means a deleted user).
_UNKNOWN = object()


def _verdict(state: bool | None) -> None:
    if state is None:
        raise AuthenticationFailed(USER_NOT_FOUND)
    if not state:
        raise AuthenticationFailed(USER_NOT_ACTIVE)


def guard_handler(handler: Callable[[Any], Any], users: ActiveUsers) -> Callable[[Any], Any]:
    """``handler`` (a REST route's) run only once the calling user is known to be active: directly when the cache
    knows it (the RPC hot path keeps its plain Deferred), after one query otherwise."""

    def guarded(request: Any) -> Any:
        waiting = users.admit(request.principal)
        if waiting is None:
            return handler(request)
        return waiting.addCallback(lambda _: _deferred(handler(request)))

    guarded.__wrapped__ = handler  # type: ignore[attr-defined]
    return guarded


def guard_routes(router: Any, users: ActiveUsers) -> None:
    """Every authenticated route of ``router`` guarded by :func:`guard_handler`."""
    for route in router.routes:
        if route.authenticated and not hasattr(route.handler, "__wrapped__"):
            route.handler = guard_handler(route.handler, users)


def _deferred(result: Any) -> Any:
    if iscoroutine(result):
        return ensureDeferred(result)
    return result


def check_now(users: ActiveUsers | None, principal: Principal) -> Deferred:
    """:meth:`ActiveUsers.admit` as a Deferred always (the WebSocket upgrade's form)."""
    if users is None:
        return succeed(None)
    try:
        waiting = users.admit(principal)
    except NanoError as error:
        return fail(error)
    return succeed(None) if waiting is None else waiting
