"""In memory: the active-user cache (a deleted or disabled user refused at once, lookups shared and invalidated),
login throttling on a task.Clock, the constant-work password check, and the activation and outdating claims."""

from __future__ import annotations

from uuid import UUID, uuid4

import bcrypt
import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed

from nanoiot.errors import AuthenticationFailed, NanoError, TokenExpired, TooManyRequests
from nanoiot.limits import parse_rates
from nanoiot.passwords import DUMMY_HASH, ROUNDS, _check, _check_dummy, hash_password_sync
from nanoiot.persistence.records import NULL_UUID, Authority, User
from nanoiot.web.active_users import TOKEN_OUTDATED, USER_NOT_ACTIVE, USER_NOT_FOUND, ActiveUsers, guard_handler
from nanoiot.web.login_throttle import LoginThrottle
from nanoiot.web.tokens import Principal, TokenIssuer, password_fingerprint

T0 = 1_700_000_000.0


def user(enabled: bool = True, password_hash: bytes = b"") -> User:
    return User(uuid4(), 0, uuid4(), NULL_UUID, "u@nanoiot.io", Authority.TENANT_ADMIN, None, None, password_hash,
                enabled)


def principal_of(record: User, issued_ms: int = int(T0 * 1000)) -> Principal:
    return Principal(record.id, record.email, record.authority, record.tenant_id, record.customer_id, issued_ms)


class Lookups:
    """The repository's ``get_user`` as the cache sees it: answers when the test says so, counts the queries."""

    def __init__(self) -> None:
        self.users: dict[UUID, User] = {}
        self.pending: list[tuple[UUID, Deferred]] = []

    def __call__(self, user_id: UUID) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((user_id, d))
        return d

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for user_id, d in pending:
            d.callback(self.users.get(user_id))


def outcome(d: Deferred) -> object:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "not fired"
    value = results[0]
    return getattr(value, "value", value)


def test_an_unknown_user_is_looked_up_once_for_callers_at_the_same_time_then_served_from_memory() -> None:
    lookups, record = Lookups(), user()
    lookups.users[record.id] = record
    users = ActiveUsers(lookups)
    first, second = users.admit(principal_of(record)), users.admit(principal_of(record))
    assert len(lookups.pending) == 1
    lookups.answer_all()
    assert outcome(first) is None and outcome(second) is None
    assert users.admit(principal_of(record)) is None  # known now: no Deferred, no query
    assert lookups.pending == []


@pytest.mark.parametrize("stored, message", [(None, USER_NOT_FOUND), (False, USER_NOT_ACTIVE)])
def test_a_deleted_or_disabled_user_is_refused_401(stored: bool | None, message: str) -> None:
    lookups, record = Lookups(), user(enabled=bool(stored))
    if stored is not None:
        lookups.users[record.id] = record
    users = ActiveUsers(lookups)
    waiting = users.admit(principal_of(record))
    lookups.answer_all()
    error = outcome(waiting)
    assert isinstance(error, AuthenticationFailed) and error.message == message
    with pytest.raises(AuthenticationFailed):
        users.admit(principal_of(record))  # remembered: refused at once


def test_a_change_forgets_the_user_tells_listeners_and_the_cluster_and_outdates_older_tokens() -> None:
    lookups, record = Lookups(), user()
    lookups.users[record.id] = record
    users = ActiveUsers(lookups)
    users.admit(principal_of(record))
    lookups.answer_all()
    told, broadcast = [], []
    users.listeners.append(told.append)
    users.broadcast = broadcast.append
    revoked_at = int(T0 * 1000) + 500
    users.changed(record.id, revoked_at)
    assert told == [record.id]
    assert broadcast == [{"t": "user-changed", "user": str(record.id), "before": revoked_at}]
    waiting = users.admit(principal_of(record, issued_ms=revoked_at - 1))  # forgotten: asks again
    lookups.answer_all()
    error = outcome(waiting)
    assert isinstance(error, TokenExpired) and error.message == TOKEN_OUTDATED
    assert users.admit(principal_of(record, issued_ms=revoked_at)) is None  # issued after: fine


def test_a_lookup_overtaken_by_a_change_is_not_remembered() -> None:
    lookups, record = Lookups(), user()
    lookups.users[record.id] = record
    users = ActiveUsers(lookups)
    waiting = users.admit(principal_of(record))
    users.changed(record.id)  # e.g. disabled while the query ran
    lookups.answer_all()
    assert outcome(waiting) is None
    assert isinstance(users.admit(principal_of(record)), Deferred)  # not cached: the next request asks again


def test_another_nodes_notice_is_applied_and_an_unreadable_one_dropped() -> None:
    lookups, record = Lookups(), user()
    lookups.users[record.id] = record
    users = ActiveUsers(lookups)
    users.admit(principal_of(record))
    lookups.answer_all()
    users.remote_change({"t": "user-changed", "user": "not-a-uuid"})
    assert users.admit(principal_of(record)) is None
    users.remote_change({"t": "user-changed", "user": str(record.id), "before": None})
    assert isinstance(users.admit(principal_of(record)), Deferred)


def test_the_cache_is_bounded() -> None:
    lookups = Lookups()
    users = ActiveUsers(lookups, max_users=3)
    records = [user() for _ in range(5)]
    for record in records:
        lookups.users[record.id] = record
        users.admit(principal_of(record))
    lookups.answer_all()
    assert len(users._known) == 3


def test_a_guarded_handler_runs_only_for_an_active_user() -> None:
    lookups, active, gone = Lookups(), user(), user()
    lookups.users[active.id] = active
    users = ActiveUsers(lookups)
    calls = []

    class Request:
        def __init__(self, principal: Principal) -> None:
            self.principal = principal

    async def handler(request: Request) -> str:
        calls.append(request.principal.user_id)
        return "ok"

    guarded = guard_handler(handler, users)
    first = guarded(Request(principal_of(active)))
    refused = guarded(Request(principal_of(gone)))
    lookups.answer_all()
    assert outcome(first) == "ok"
    assert isinstance(outcome(refused), AuthenticationFailed)
    assert calls == [active.id]
    with pytest.raises(NanoError):
        guarded(Request(principal_of(gone)))


# --- login throttling -------------------------------------------------------------------------------------------------

def test_attempts_beyond_an_accounts_budget_are_refused_429_until_it_refills() -> None:
    clock = task.Clock()
    throttle = LoginThrottle(parse_rates("3:60"), parse_rates("100:60"), clock.seconds)
    for _ in range(3):
        throttle.attempt("User@Example.com", "10.0.0.1")
    with pytest.raises(TooManyRequests) as refused:
        throttle.attempt("user@example.com ", "10.0.0.2")  # the same account, whatever the case or address
    assert refused.value.http_status == 429 and refused.value.headers() == {b"retry-after": b"20"}
    throttle.attempt("other@example.com", "10.0.0.1")
    clock.advance(20)
    throttle.attempt("user@example.com", "10.0.0.1")


def test_a_success_resets_the_account_but_not_the_address() -> None:
    clock = task.Clock()
    throttle = LoginThrottle(parse_rates("2:60"), parse_rates("4:60"), clock.seconds)
    throttle.attempt("a@x.io", "10.0.0.1")
    throttle.attempt("a@x.io", "10.0.0.1")
    throttle.succeeded("a@x.io")
    throttle.attempt("a@x.io", "10.0.0.1")
    throttle.attempt("b@x.io", "10.0.0.1")
    with pytest.raises(TooManyRequests):
        throttle.attempt("c@x.io", "10.0.0.1")  # the address spent its 4


def test_no_rates_means_no_limit() -> None:
    throttle = LoginThrottle((), (), task.Clock().seconds)
    for _ in range(1000):
        throttle.attempt("a@x.io", "10.0.0.1")


# --- passwords and tokens ---------------------------------------------------------------------------------------------

def test_the_dummy_hash_costs_what_a_real_one_does_and_matches_nothing() -> None:
    assert DUMMY_HASH.startswith(b"$2b$%02d$" % ROUNDS)
    assert bcrypt.checkpw(b"anything", DUMMY_HASH) is False
    assert _check_dummy("anything") is False
    assert _check("anything", b"") is False  # a user without a password (not activated): refused, no exception
    assert _check("x" * 100, hash_password_sync("x" * 100)) is True  # beyond bcrypt's 72 bytes: no exception


def test_tokens_carry_their_issue_time_in_milliseconds_and_activation_tokens_work_once() -> None:
    clock = task.Clock()
    clock.advance(T0 + 0.25)
    issuer = TokenIssuer(b"k" * 64, 900, 3600, clock)
    record = user(password_hash=b"")
    pair = issuer.issue(record)
    assert issuer.verify_access(pair["token"]).issued_ms == int(T0 * 1000) + 250
    assert issuer.verify_refresh_claims(pair["refreshToken"])[1] == int(T0 * 1000) + 250
    activation = issuer.issue_activation(record)
    assert issuer.verify_activation(activation) == (record.id, password_fingerprint(b""))
    with pytest.raises(AuthenticationFailed):
        issuer.verify_access(activation)  # not an access token
    with pytest.raises(AuthenticationFailed):
        issuer.verify_activation(pair["token"])
    clock.advance(24 * 3600 + 1)
    with pytest.raises(TokenExpired):
        issuer.verify_activation(activation)


def test_lookups_that_fail_fail_every_waiting_caller_and_are_not_remembered() -> None:
    record = user()
    calls = []

    def failing(user_id: UUID) -> Deferred:
        calls.append(user_id)
        d: Deferred = Deferred()
        d.errback(RuntimeError("database down"))
        return d

    users = ActiveUsers(failing)
    error = outcome(users.admit(principal_of(record)))
    assert isinstance(error, RuntimeError)
    users.admit(principal_of(record)).addErrback(lambda f: None)
    assert len(calls) == 2


def test_a_lookup_that_answers_at_once_is_used_at_once() -> None:
    record = user()
    users = ActiveUsers(lambda user_id: succeed(record))
    assert outcome(users.admit(principal_of(record))) is None
    assert users.admit(principal_of(record)) is None
