"""Checks of client values at the edge, against the limits SQLite and PostgreSQL share.

SQLite stores a 300-character name in a ``VARCHAR(255)`` column and PostgreSQL refuses it; SQLite cannot hold an
integer beyond 64 bits and PostgreSQL answers "bigint out of range": without these checks the two databases would
accept different inputs, and a refused value would become a 500 (or fail a write shared with other tenants). Every
check raises a 400 with ThingsBoard's error body whose message names the field, before anything reaches an actor,
the journal or the database. Pure functions: no request, no I/O.
"""

from __future__ import annotations

from typing import Any, Final
from uuid import UUID

from nanoiot.errors import BadRequest, InvalidArguments

#: The length of every ``VARCHAR`` column a client fills (names, types, labels, titles, e-mails, access tokens).
MAX_TEXT: Final = 255
#: The range of a ``BIGINT`` column (and of SQLite's INTEGER).
MIN_BIGINT: Final = -(2**63)
MAX_BIGINT: Final = 2**63 - 1
#: Nesting depth of a JSON value the server stores (additionalInfo, params, configuration): far beyond any real
#: document, far below what would exhaust the stack when it is read back.
MAX_JSON_DEPTH: Final = 32
#: How much of a bad value an error message repeats.
_SHOWN = 64


def shown(value: Any) -> str:
    """A bad value as an error message repeats it: short, whatever its size."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def text(field: str, value: Any, max_len: int = MAX_TEXT, required: bool = False) -> str | None:
    """``value`` if it is a string both databases store in a column of ``max_len`` characters (None when absent
    and not required)."""
    if value is None:
        if required:
            raise BadRequest(f"{field}: is required")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{field}: must be a string")
    if len(value) > max_len:
        raise BadRequest(f"{field}: must be at most {max_len} characters (got {len(value)})")
    if "\x00" in value:
        raise BadRequest(f"{field}: must not contain the NUL character")  # PostgreSQL refuses it in text
    if required and not value.strip():
        raise BadRequest(f"{field}: must not be empty")
    return value


def uuid_param(name: str, value: Any) -> UUID:
    """A UUID from a path, query or body field; a 400 naming ``name`` otherwise (never a 404 or a 500 from the
    database)."""
    if isinstance(value, str) and len(value) <= 64:  # the longest spelling UUID() accepts is 45 characters
        try:
            return UUID(value)
        except ValueError:
            pass
    raise BadRequest(f"{name}: Invalid UUID string: {shown(value)}")


def int_param(name: str, raw: Any, lo: int = MIN_BIGINT, hi: int = MAX_BIGINT) -> int:
    """A whole number in ``lo..hi`` from a query string or a JSON number (booleans and fractions refused)."""
    if isinstance(raw, bool):
        raise InvalidArguments(f"{name}: must be a whole number, got {shown(raw)}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, str) and len(raw) <= 40:
        try:
            value = int(raw.strip())
        except ValueError:
            raise InvalidArguments(f"{name}: must be a whole number, got '{shown(raw)}'") from None
    else:
        raise InvalidArguments(f"{name}: must be a whole number, got {shown(raw)}")
    if value < lo:
        raise InvalidArguments(f"{name}: must be at least {lo}, got {value}")
    if value > hi:
        raise InvalidArguments(f"{name}: must be at most {hi}, got {value}")
    return value


def json_depth(field: str, value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``value`` if its JSON nesting is at most ``max_depth`` levels (checked without recursion)."""
    # Fast path for the common case (RPC params such as ``{"pin": 4}``): a scalar or a flat object/list.
    if isinstance(value, dict):
        flat: Any = value.values()
    elif isinstance(value, list):
        flat = value
    else:
        return value
    if max_depth >= 1:
        for child in flat:
            if isinstance(child, (dict, list)):
                break
        else:
            return value
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise BadRequest(f"{field}: nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return value


def json_object(value: Any, what: str = "request body") -> dict[str, Any]:
    """A JSON object body, whole (its fields are checked one by one by the handler)."""
    if not isinstance(value, dict):
        raise BadRequest(f"Invalid {what}: expected a JSON object")
    return value
