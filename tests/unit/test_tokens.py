"""JWTs with ThingsBoard's claims; expiry checked against the injected clock, also for remembered tokens."""

from uuid import uuid4

import jwt
import pytest
from twisted.internet import task

from nanoiot.errors import AuthenticationFailed, TokenExpired
from nanoiot.persistence.records import NULL_UUID, Authority, User
from nanoiot.web.tokens import TokenIssuer

KEY = b"k" * 64
USER = User(uuid4(), 0, uuid4(), NULL_UUID, "tenant@nanoiot.io", Authority.TENANT_ADMIN, "T", "A", b"")


def issuer() -> tuple[TokenIssuer, task.Clock]:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    return TokenIssuer(KEY, 100, 1000, clock), clock


def test_an_access_token_carries_thingsboards_claims():
    tokens, _ = issuer()
    pair = tokens.issue(USER)
    claims = jwt.decode(pair["token"], KEY, algorithms=["HS512"], options={"verify_exp": False},
                        issuer="nanoiot.io")
    assert claims["sub"] == USER.email and claims["scopes"] == ["TENANT_ADMIN"]
    assert claims["userId"] == str(USER.id) and claims["tenantId"] == str(USER.tenant_id)
    assert claims["customerId"] == str(NULL_UUID) and claims["exp"] - claims["iat"] == 100


def test_a_verified_token_gives_the_principal_and_stays_valid_until_it_expires():
    tokens, clock = issuer()
    token = tokens.issue(USER)["token"]
    principal = tokens.verify_access(token)
    assert (principal.user_id, principal.authority) == (USER.id, Authority.TENANT_ADMIN)
    assert tokens.verify_access(token) == principal  # remembered
    clock.advance(100)
    with pytest.raises(TokenExpired):
        tokens.verify_access(token)
    with pytest.raises(TokenExpired):
        tokens.verify_access(token)


def test_a_tampered_or_foreign_token_is_refused():
    tokens, _ = issuer()
    token = tokens.issue(USER)["token"]
    with pytest.raises(AuthenticationFailed):
        tokens.verify_access(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    other = TokenIssuer(b"x" * 64, 100, 1000, tokens.clock).issue(USER)["token"]
    with pytest.raises(AuthenticationFailed):
        tokens.verify_access(other)


def test_a_refresh_token_is_not_an_access_token_and_vice_versa():
    tokens, _ = issuer()
    pair = tokens.issue(USER)
    assert tokens.verify_refresh(pair["refreshToken"]) == USER.id
    with pytest.raises(AuthenticationFailed):
        tokens.verify_refresh(pair["token"])
    with pytest.raises(AuthenticationFailed):
        tokens.verify_access(pair["refreshToken"])
