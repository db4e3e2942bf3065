"""``/api/auth``: login, token refresh and the current user, as ThingsBoard's clients expect them."""

from __future__ import annotations

from typing import Any

from nanoiot.errors import AuthenticationFailed
from nanoiot.passwords import check_password
from nanoiot.web.context import WebContext
from nanoiot.web.routing import ApiRequest, Router
from nanoiot.web.shapes import user_json

INVALID_LOGIN = "Invalid username or password"


class AuthApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def register(self, router: Router) -> None:
        router.add("POST", "/api/auth/login", self.login, authenticated=False)
        router.add("GET", "/api/auth/login", self.wrong_method, authenticated=False)
        router.add("POST", "/api/auth/token", self.refresh, authenticated=False)
        router.add("GET", "/api/auth/user", self.current_user)

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
        user = await self.context.repository.get_user_by_email(username)
        if user is None or not await check_password(password, user.password_hash):
            raise AuthenticationFailed(INVALID_LOGIN)
        return self.context.tokens.issue(user)

    async def refresh(self, request: ApiRequest) -> dict[str, str]:
        try:
            body = request.json_body()
        except Exception:
            raise AuthenticationFailed("Authentication failed") from None
        token = body.get("refreshToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed("Authentication failed")
        user_id = self.context.tokens.verify_refresh(token)
        user = await self.context.repository.get_user(user_id)
        if user is None:
            raise AuthenticationFailed("User not found")
        return self.context.tokens.issue(user)

    async def current_user(self, request: ApiRequest) -> dict[str, Any]:
        user = await self.context.repository.get_user(request.user.user_id)
        if user is None:
            raise AuthenticationFailed("User not found")
        return user_json(user)
