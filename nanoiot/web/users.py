"""``/api/user``: users as ThingsBoard manages them — the system administrator creates tenant administrators, a
tenant administrator the administrators and customer users of its tenant; deleting or disabling a user stops its
tokens at once (:mod:`nanoiot.web.active_users`).

A new user has no password, as in ThingsBoard: ``GET /api/user/{userId}/activationLink`` gives the link whose
``activateToken`` sets it (``POST /api/noauth/activate {"activateToken", "password"}``, answered with a token pair).
No mail is sent (``sendActivationMail`` is accepted and ignored).
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import quote
from uuid import UUID

from nanoiot.errors import AuthenticationFailed, BadRequest, NotFound, PermissionDenied
from nanoiot.passwords import hash_password
from nanoiot.persistence.account_store import AccountStore
from nanoiot.persistence.records import NULL_UUID, Authority, User
from nanoiot.validation import text, uuid_param
from nanoiot.web.context import WebContext
from nanoiot.web.devices import CUSTOMER_NOT_FOUND, _id_of
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router
from nanoiot.web.shapes import user_json
from nanoiot.web.tenants import TENANT_NOT_FOUND
from nanoiot.web.tokens import Principal, password_fingerprint

USER_NOT_FOUND = "User with requested id wasn't found!"
#: Stored for a user who has not set a password yet: no bcrypt hash, so no password matches it.
NO_PASSWORD = b""
MIN_PASSWORD = 6
#: bcrypt reads at most 72 bytes of a password.
MAX_PASSWORD_BYTES = 72


def _text(body: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if required and (value is None or (isinstance(value, str) and not value.strip())):
        raise BadRequest(f"User {key} should be specified!")
    return text(key, value)


def _email(body: dict[str, Any]) -> str:
    email = _text(body, "email", required=True)
    assert email is not None
    local, at, domain = email.strip().partition("@")
    if not at or not local or "." not in domain or " " in email.strip():
        raise BadRequest(f"Invalid email address format '{email}'!")
    return email.strip()


def check_user_access(principal: Principal, user: User | None, write: bool) -> User:
    """ThingsBoard's rules: the system administrator manages administrators (not customer users), a tenant
    administrator the users of its tenant, a customer user reads only itself."""
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    if principal.authority is Authority.SYS_ADMIN:
        if user.authority is Authority.CUSTOMER_USER:
            raise PermissionDenied()
        return user
    if principal.authority is Authority.TENANT_ADMIN:
        if user.authority is Authority.SYS_ADMIN or user.tenant_id != principal.tenant_id:
            raise PermissionDenied()
        return user
    if write or user.id != principal.user_id:
        raise PermissionDenied()
    return user


def validate_password(password: Any) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise BadRequest(f"Password should be at least {MIN_PASSWORD} characters long")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise BadRequest(f"Password should be at most {MAX_PASSWORD_BYTES} bytes long")
    return password


class UserApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        self.store = AccountStore(context.repository)

    def register(self, router: Router) -> None:
        router.add("POST", "/api/user", self.save_user)
        router.add("GET", "/api/user/{userId}", self.get_user)
        router.add("DELETE", "/api/user/{userId}", self.delete_user)
        router.add("POST", "/api/user/{userId}/userCredentialsEnabled", self.set_enabled)
        router.add("GET", "/api/user/{userId}/activationLink", self.activation_link)
        router.add("POST", "/api/noauth/activate", self.activate, authenticated=False)

    async def _user(self, request: ApiRequest, write: bool) -> User:
        user = await self.store.get_user(uuid_param("userId", request.params["userId"]))
        return check_user_access(request.user, user, write)

    def _changed(self, user_id: UUID, revoke: bool) -> None:
        users = self.context.tokens.users
        if users is not None:
            users.changed(user_id, int(self.context.clock.seconds() * 1000) if revoke else None)

    async def get_user(self, request: ApiRequest) -> dict[str, Any]:
        return user_json(await self._user(request, write=False))

    async def delete_user(self, request: ApiRequest) -> Response:
        user = await self._user(request, write=True)
        if user.id == request.user.user_id:
            raise BadRequest("It is not allowed to delete own account")
        if not await self.store.delete_user(user.id):
            raise NotFound(USER_NOT_FOUND)
        self._changed(user.id, revoke=True)
        return Response(body=NO_BODY)

    async def set_enabled(self, request: ApiRequest) -> Response:
        raw = (request.query("userCredentialsEnabled") or "").strip().lower()
        if raw not in ("true", "false"):
            raise BadRequest("Parameter 'userCredentialsEnabled' must be true or false")
        enabled = raw == "true"
        user = await self._user(request, write=True)
        if user.id == request.user.user_id and not enabled:
            raise BadRequest("It is not allowed to disable own account")
        if not await self.store.set_enabled(user.id, enabled):
            raise NotFound(USER_NOT_FOUND)
        self._changed(user.id, revoke=not enabled)
        return Response(body=NO_BODY)

    async def save_user(self, request: ApiRequest) -> dict[str, Any]:
        principal = request.user
        if principal.authority is Authority.CUSTOMER_USER:
            raise PermissionDenied()
        body = request.json_body()
        if not isinstance(body, dict):
            raise BadRequest("Invalid request body")
        email = _email(body)
        first_name, last_name = _text(body, "firstName"), _text(body, "lastName")
        existing_id = _id_of(body.get("id"))
        if existing_id:
            user = check_user_access(principal, await self.store.get_user(uuid_param("id", existing_id)), write=True)
            if body.get("authority") not in (None, user.authority.value):
                raise BadRequest("User authority can't be changed")
            updated = await self.store.update_user(user.id, email, first_name, last_name)
            if updated.email.lower() != user.email.lower():
                self._changed(user.id, revoke=True)  # tokens name the e-mail: the old ones are outdated
            return user_json(updated)
        authority = self._authority(body)
        tenant_id, customer_id = await self._owner(principal, authority, body)
        user = await self.context.repository.create_user(email, NO_PASSWORD, authority, tenant_id, customer_id,
                                                         first_name, last_name)
        return user_json(user)

    @staticmethod
    def _authority(body: dict[str, Any]) -> Authority:
        raw = body.get("authority")
        try:
            return Authority(raw)
        except ValueError:
            names = ", ".join(a.value for a in Authority)
            raise BadRequest(f"User authority should be one of {names}, got {raw!r}") from None

    async def _owner(self, principal: Principal, authority: Authority, body: dict[str, Any]) -> tuple[UUID, UUID]:
        """The tenant and customer a new user belongs to, as the caller may create it."""
        if principal.authority is Authority.SYS_ADMIN:
            if authority is not Authority.TENANT_ADMIN:
                raise PermissionDenied("The system administrator creates tenant administrators only")
            raw_tenant = _id_of(body.get("tenantId"))
            if not raw_tenant:
                raise BadRequest("Tenant id should be specified!")
            tenant = await self.context.repository.get_tenant(uuid_param("tenantId", raw_tenant))
            if tenant is None:
                raise NotFound(TENANT_NOT_FOUND)
            return tenant.id, NULL_UUID
        if authority is Authority.SYS_ADMIN:
            raise PermissionDenied()
        if authority is Authority.TENANT_ADMIN:
            return principal.tenant_id, NULL_UUID
        raw_customer = _id_of(body.get("customerId"))
        if not raw_customer or uuid_param("customerId", raw_customer) == NULL_UUID:
            raise BadRequest("Customer id should be specified for a customer user!")
        customer = await self.context.repository.get_customer(uuid_param("customerId", raw_customer))
        if customer is None or customer.tenant_id != principal.tenant_id:
            raise NotFound(CUSTOMER_NOT_FOUND)
        return principal.tenant_id, customer.id

    # --- activation -----------------------------------------------------------------------------------------------

    async def activation_link(self, request: ApiRequest) -> Response:
        user = await self._user(request, write=True)
        if user.password_hash != NO_PASSWORD:
            raise BadRequest("User is already activated!")
        token = self.context.tokens.issue_activation(user)
        http = request.request
        scheme = b"https" if http.isSecure() else b"http"
        host = (http.getHeader(b"host") or b"localhost").decode("ascii", "replace")
        link = f"{scheme.decode()}://{host}/api/noauth/activate?activateToken={quote(token)}"
        return Response(body=link.encode(), content_type=b"text/plain")

    async def activate(self, request: ApiRequest) -> dict[str, str]:
        body = request.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("activateToken"), str):
            raise BadRequest("Activation token should be specified!")
        password = validate_password(body.get("password"))
        user_id, fingerprint = self.context.tokens.verify_activation(body["activateToken"])
        user = await self.store.get_user(user_id)
        if user is None or not hmac.compare_digest(password_fingerprint(user.password_hash), fingerprint):
            raise AuthenticationFailed("Activation token is not valid or was used already")
        if not user.enabled:
            raise AuthenticationFailed("User is not active")
        new_hash = await hash_password(password)
        if not await self.store.set_password(user.id, new_hash, user.password_hash):
            raise AuthenticationFailed("Activation token is not valid or was used already")
        user = await self.store.get_user(user.id)
        if user is None:
            raise AuthenticationFailed("Activation token is not valid or was used already")
        return self.context.tokens.issue(user)
