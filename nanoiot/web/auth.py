"""``/api/auth``: login, token refresh and the current user, as ThingsBoard's clients expect them.

Logins are throttled per account and per address (:mod:`nanoiot.web.login_throttle`, 429 with ``Retry-After``), take
one bcrypt check whether or not the user exists (so the time tells no one which e-mails are registered), and are
refused for a disabled user; a refresh is refused for a deleted or disabled user, and for a refresh token issued
before the user was disabled. ``POST /api/auth/changePassword`` outdates the caller's earlier tokens.
"""

from __future__ import annotations

from typing import Any

from nanoiot.errors import AuthenticationFailed, BadRequest, Conflict
from nanoiot.limits import parse_rates
from nanoiot.passwords import check_password_or_dummy, hash_password
from nanoiot.persistence.account_store import AccountStore
from nanoiot.web.active_users import USER_NOT_ACTIVE, USER_NOT_FOUND, check_now
from nanoiot.web.context import WebContext
from nanoiot.web.login_throttle import LoginThrottle
from nanoiot.web.routing import ApiRequest, Router
from nanoiot.web.shapes import user_json
from nanoiot.web.tokens import Principal
from nanoiot.web.users import validate_password

INVALID_LOGIN = "Invalid username or password"


def client_address(request: ApiRequest) -> str:
    address = request.request.getClientAddress()
    return getattr(address, "host", None) or str(address)


class AuthApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        config = context.config
        self.throttle = LoginThrottle(parse_rates(config.login_rate_limit_per_account),
                                      parse_rates(config.login_rate_limit_per_address), context.clock.seconds)
        self.accounts = AccountStore(context.repository)
        #: bcrypt against the user's hash, or a dummy one when there is no such user (a collaborator, so that tests
        #: can count the checks).
        self.check_password = check_password_or_dummy

    def register(self, router: Router) -> None:
        router.add("POST", "/api/auth/login", self.login, authenticated=False)
        router.add("GET", "/api/auth/login", self.wrong_method, authenticated=False)
        router.add("POST", "/api/auth/token", self.refresh, authenticated=False)
        router.add("GET", "/api/auth/user", self.current_user)
        router.add("POST", "/api/auth/changePassword", self.change_password)

    def wrong_method(self, request: ApiRequest) -> Any:
        raise AuthenticationFailed("Authentication method not supported")

    async def login(self, request: ApiRequest) -> dict[str, str]:
        try:
            body = request.json_body()
        except Exception:
            raise AuthenticationFailed("Authentication failed") from None
        if not isinstance(body, dict):
            raise AuthenticationFailed("Authentication failed")
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            raise AuthenticationFailed("Authentication failed")
        self.throttle.attempt(username, client_address(request))
        user = await self.context.repository.get_user_by_email(username)
        matches = await self.check_password(password, user.password_hash if user is not None else None)
        if user is None or not matches:
            raise AuthenticationFailed(INVALID_LOGIN)
        if not user.enabled:
            raise AuthenticationFailed(USER_NOT_ACTIVE)
        self.throttle.succeeded(username)
        return self.context.tokens.issue(user)

    async def refresh(self, request: ApiRequest) -> dict[str, str]:
        try:
            body = request.json_body()
        except Exception:
            raise AuthenticationFailed("Authentication failed") from None
        token = body.get("refreshToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed("Authentication failed")
        user_id, issued_ms = self.context.tokens.verify_refresh_claims(token)
        user = await self.context.repository.get_user(user_id)
        if user is None:
            raise AuthenticationFailed(USER_NOT_FOUND)
        if not user.enabled:
            raise AuthenticationFailed(USER_NOT_ACTIVE)
        # A refresh token issued before the user was disabled (or deleted and re-created) is outdated too.
        await check_now(self.context.tokens.users, Principal(user.id, user.email, user.authority, user.tenant_id,
                                                             user.customer_id, issued_ms))
        return self.context.tokens.issue(user)

    async def change_password(self, request: ApiRequest) -> dict[str, str]:
        """ThingsBoard's ``{"currentPassword", "newPassword"}``: the caller's tokens issued before are outdated on
        every node; the answer is a new token pair."""
        body = request.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("currentPassword"), str):
            raise BadRequest("currentPassword should be specified!")
        new_password = validate_password(body.get("newPassword"))
        principal = request.user
        self.throttle.attempt(principal.email, client_address(request))
        user = await self.context.repository.get_user(principal.user_id)
        if user is None:
            raise AuthenticationFailed(USER_NOT_FOUND)
        if not await self.check_password(body["currentPassword"], user.password_hash):
            raise BadRequest("Current password doesn't match!")
        self.throttle.succeeded(principal.email)
        new_hash = await hash_password(new_password)
        if not await self.accounts.set_password(user.id, new_hash, user.password_hash):
            raise Conflict("The password was changed meanwhile; try again")
        users = self.context.tokens.users
        if users is not None:
            users.changed(user.id, int(self.context.clock.seconds() * 1000))
        return self.context.tokens.issue(user)

    async def current_user(self, request: ApiRequest) -> dict[str, Any]:
        user = await self.context.repository.get_user(request.user.user_id)
        if user is None:
            raise AuthenticationFailed(USER_NOT_FOUND)
        return user_json(user)
