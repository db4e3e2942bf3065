"""JWT access and refresh tokens with ThingsBoard's claims, so its REST clients decode them unchanged."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import jwt

from nanoiot.errors import AuthenticationFailed, ConfigError, TokenExpired
from nanoiot.persistence.records import NULL_UUID, Authority, User

ISSUER = "nanoiot.io"
#: Verified access tokens remembered at most (cleared when full: a cache miss only costs a verification).
VERIFIED_CACHE_SIZE = 10_000
ALGORITHM = "HS512"
ACTIVATE_SCOPE = "ACTIVATE"
#: Seconds an activation link stays usable (ThingsBoard's default is a day too).
ACTIVATION_LIFETIME = 24 * 3600


def password_fingerprint(password_hash: bytes) -> str:
    """A short digest of a stored password hash (never the hash itself in a token)."""
    return hashlib.sha256(password_hash).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as read from a verified access token (no database round trip per request)."""

    user_id: UUID
    email: str
    authority: Authority
    tenant_id: UUID
    customer_id: UUID
    #: When the token was issued (epoch ms; ``iatMs``, else ``iat``): tokens issued before a user was disabled stay
    #: refused.
    issued_ms: int = 0

    @property
    def is_customer(self) -> bool:
        return self.authority is Authority.CUSTOMER_USER


def load_signing_key(configured: str, key_file: str) -> bytes:
    """The configured key, else the one kept in ``key_file``, else a new one written there (mode 0600)."""
    if configured:
        return configured.encode("utf-8")
    path = Path(key_file)
    try:
        if path.exists():
            key = path.read_text().strip()
            if key:
                return key.encode("utf-8")
        key = base64.urlsafe_b64encode(secrets.token_bytes(64)).decode("ascii")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        return key.encode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read or create the JWT key file {key_file!r}: {exc.strerror}") from None


class TokenIssuer:
    def __init__(self, key: bytes, access_lifetime: int, refresh_lifetime: int, clock: Any,
                 users: Any = None) -> None:
        self.key = key
        #: :class:`nanoiot.web.active_users.ActiveUsers`: whether a token's user still exists and is enabled
        #: (checked on every REST request and WebSocket upgrade); None: not checked.
        self.users = users
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.clock = clock
        self._verified: dict[str, tuple[Principal, int]] = {}

    def issue(self, user: User) -> dict[str, str]:
        exact = self.clock.seconds()
        now = int(exact)
        # iat is whole seconds; iatMs tells a token issued just after its user was re-enabled from one just before.
        issued_ms = int(exact * 1000)
        session_id = str(uuid.uuid4())
        access = {
            "sub": user.email,
            "userId": str(user.id),
            "scopes": [user.authority.value],
            "sessionId": session_id,
            "firstName": user.first_name,
            "lastName": user.last_name,
            "enabled": user.enabled,
            "isPublic": False,
            "tenantId": str(user.tenant_id),
            "customerId": str(user.customer_id),
            "iss": ISSUER,
            "iat": now,
            "iatMs": issued_ms,
            "exp": now + self.access_lifetime,
        }
        refresh = {
            "sub": user.email,
            "userId": str(user.id),
            "scopes": ["REFRESH_TOKEN"],
            "sessionId": session_id,
            "isPublic": False,
            "jti": str(uuid.uuid4()),
            "iss": ISSUER,
            "iat": now,
            "iatMs": issued_ms,
            "exp": now + self.refresh_lifetime,
        }
        return {
            "token": jwt.encode(access, self.key, algorithm=ALGORITHM),
            "refreshToken": jwt.encode(refresh, self.key, algorithm=ALGORITHM),
        }

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            # Expiry is checked against the injected clock (tests drive it), not PyJWT's wall clock.
            return jwt.decode(
                token, self.key, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["exp", "iat", "sub"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise AuthenticationFailed("Invalid JWT token") from None

    def _check_expiry(self, claims: dict[str, Any]) -> None:
        if int(claims["exp"]) <= int(self.clock.seconds()):
            raise TokenExpired()

    def verify_access(self, token: str) -> Principal:
        """A token's signature is verified once; later calls with the same token only check its expiry (an HS512
        verification costs ~110 us, a fifth of a REST RPC's CPU)."""
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if expires <= int(self.clock.seconds()):
                del self._verified[token]
                raise TokenExpired()
            return principal
        claims = self._decode(token)
        self._check_expiry(claims)
        principal = self._principal(claims)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, int(claims["exp"]))
        return principal

    def _principal(self, claims: dict[str, Any]) -> Principal:
        scopes = claims.get("scopes") or []
        try:
            authority = Authority(scopes[0])
            return Principal(
                user_id=UUID(claims["userId"]),
                email=claims["sub"],
                authority=authority,
                tenant_id=UUID(claims.get("tenantId") or str(NULL_UUID)),
                customer_id=UUID(claims.get("customerId") or str(NULL_UUID)),
                issued_ms=_issued_ms(claims),
            )
        except (ValueError, KeyError, IndexError, TypeError):
            raise AuthenticationFailed("Invalid JWT token") from None

    def issue_activation(self, user: User, lifetime: int = ACTIVATION_LIFETIME) -> str:
        """A link token that sets ``user``'s first password (``POST /api/noauth/activate``). It names the stored
        password hash (a digest of it), so that it works once: the new password changes that hash."""
        now = int(self.clock.seconds())
        claims = {"sub": user.email, "userId": str(user.id), "scopes": [ACTIVATE_SCOPE],
                  "pwd": password_fingerprint(user.password_hash), "iss": ISSUER, "iat": now, "exp": now + lifetime}
        return jwt.encode(claims, self.key, algorithm=ALGORITHM)

    def verify_activation(self, token: str) -> tuple[UUID, str]:
        """The user id and password fingerprint an activation token carries."""
        claims = self._decode(token)
        self._check_expiry(claims)
        if claims.get("scopes") != [ACTIVATE_SCOPE]:
            raise AuthenticationFailed("Invalid activation token")
        try:
            return UUID(claims["userId"]), str(claims["pwd"])
        except (ValueError, KeyError, TypeError):
            raise AuthenticationFailed("Invalid activation token") from None

    def verify_refresh(self, token: str) -> UUID:
        return self.verify_refresh_claims(token)[0]

    def verify_refresh_claims(self, token: str) -> tuple[UUID, int]:
        """The refresh token's user id and issue time (epoch ms)."""
        claims = self._decode(token)
        self._check_expiry(claims)
        if claims.get("scopes") != ["REFRESH_TOKEN"]:
            raise AuthenticationFailed("Invalid refresh token")
        try:
            return UUID(claims["userId"]), _issued_ms(claims)
        except (ValueError, KeyError, TypeError):
            raise AuthenticationFailed("Invalid refresh token") from None


def _issued_ms(claims: dict[str, Any]) -> int:
    exact = claims.get("iatMs")
    return int(exact) if isinstance(exact, int) else int(claims["iat"]) * 1000
