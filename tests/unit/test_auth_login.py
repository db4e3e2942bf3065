"""``POST /api/auth/login`` in memory (treq's StubTreq over the real router and AuthApi, a task.Clock): the same
password work whether or not the user exists, one answer for both, a disabled user refused, throttling answered 429
with Retry-After and ThingsBoard's body."""

from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from nanoiot.config import Config
from nanoiot.persistence.records import NULL_UUID, Authority, User
from nanoiot.web.auth import INVALID_LOGIN, AuthApi
from nanoiot.web.context import WebContext
from nanoiot.web.routing import JsonApi, Router
from nanoiot.web.tokens import TokenIssuer

HASH = b"$2b$10$stored-hash-of-the-user"


class Users:
    """The repository as login sees it."""

    def __init__(self, *users: User) -> None:
        self.by_email = {u.email: u for u in users}

    def get_user_by_email(self, email: str) -> Deferred:
        return succeed(self.by_email.get(email.lower()))


class Login:
    def __init__(self, *users: User, **config: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        context = WebContext(config=Config(**config), clock=self.clock, repository=Users(*users),  # type: ignore
                             catalog=None, directory=None,  # type: ignore[arg-type]
                             tokens=TokenIssuer(b"k" * 64, 900, 3600, self.clock), commands=None)  # type: ignore
        self.auth = AuthApi(context)
        #: (password, hash or None) of every password check asked for; the right password is "right".
        self.checks: list[tuple[str, bytes | None]] = []
        self.auth.check_password = self._check
        router = Router()
        self.auth.register(router)
        self.stub = StubTreq(JsonApi(router, context.tokens, self.clock, 1024))

    def _check(self, password: str, password_hash: bytes | None) -> Deferred:
        self.checks.append((password, password_hash))
        return succeed(password_hash is not None and password == "right")

    def post(self, email: str, password: str) -> tuple[int, Any, Any]:
        d = self.stub.post("http://nanoiot.test/api/auth/login", json.dumps({"username": email,
                                                                            "password": password}).encode())
        self.stub.flush()
        response = _fired(d)
        body = _fired(self.stub.content(response))
        return response.code, json.loads(body), response.headers


def _fired(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not answered"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def user(email: str, enabled: bool = True) -> User:
    return User(uuid4(), 0, uuid4(), NULL_UUID, email, Authority.TENANT_ADMIN, None, None, HASH, enabled)


def test_an_unknown_user_costs_a_password_check_too_and_gets_the_same_answer() -> None:
    login = Login(user("known@x.io"))
    unknown = login.post("nobody@x.io", "wrong")
    known = login.post("known@x.io", "wrong")
    assert login.checks == [("wrong", None), ("wrong", HASH)]  # None: checked against the dummy hash
    assert unknown[:2] == known[:2] == (401, {"status": 401, "message": INVALID_LOGIN, "errorCode": 10,
                                             "timestamp": 1_700_000_000_000})


def test_the_right_password_logs_in_unless_the_user_is_disabled() -> None:
    login = Login(user("known@x.io"), user("off@x.io", enabled=False))
    status, body, _ = login.post("known@x.io", "right")
    assert status == 200 and set(body) == {"token", "refreshToken"}
    status, body, _ = login.post("off@x.io", "right")
    assert (status, body["message"]) == (401, "User is not active")
    status, body, _ = login.post("off@x.io", "wrong")
    assert (status, body["message"]) == (401, INVALID_LOGIN)  # the wrong password says nothing about the state


def test_throttled_attempts_are_429_with_retry_after_and_check_no_password() -> None:
    login = Login(user("known@x.io"), login_rate_limit_per_account="2:60")
    assert [login.post("known@x.io", "wrong")[0] for _ in range(2)] == [401, 401]
    status, body, headers = login.post("known@x.io", "right")
    assert status == 429 and body["errorCode"] == 33 and body["status"] == 429
    assert headers.getRawHeaders(b"retry-after") == [b"30"]
    assert len(login.checks) == 2
    login.clock.advance(30)
    assert login.post("known@x.io", "right")[0] == 200
    # The success emptied the account's bucket: two more mistakes are allowed at once.
    assert [login.post("known@x.io", "wrong")[0] for _ in range(2)] == [401, 401]


def test_the_per_address_limit_covers_every_account_tried_from_it() -> None:
    login = Login(login_rate_limit_per_address="3:60", login_rate_limit_per_account="")
    assert [login.post(f"u{i}@x.io", "pw")[0] for i in range(4)] == [401, 401, 401, 429]
