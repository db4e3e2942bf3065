"""ThingsBoard's paging query parameters, validated with errors that name the bad value."""

from __future__ import annotations

from nanoiot.errors import InvalidArguments
from nanoiot.persistence.records import PageLink, SortOrder
from nanoiot.web.routing import ApiRequest


def _int_param(request: ApiRequest, name: str, minimum: int) -> int:
    raw = request.query(name)
    if raw is None:
        raise InvalidArguments(f"Required request parameter '{name}' is not present")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArguments(f"Parameter '{name}' must be a whole number, got '{raw}'") from None
    if value < minimum:
        raise InvalidArguments(f"Parameter '{name}' must be at least {minimum}, got {value}")
    return value


def page_link(request: ApiRequest, sort_properties: tuple[str, ...]) -> PageLink:
    page_size = _int_param(request, "pageSize", 1)
    page = _int_param(request, "page", 0)
    sort_property = request.query("sortProperty") or None
    if sort_property is not None and sort_property not in sort_properties:
        allowed = ", ".join(sort_properties)
        raise InvalidArguments(f"Invalid sortProperty '{sort_property}': use one of {allowed}")
    raw_order = (request.query("sortOrder") or "ASC").upper()
    try:
        order = SortOrder(raw_order)
    except ValueError:
        raise InvalidArguments(f"Invalid sortOrder '{raw_order}': use ASC or DESC") from None
    return PageLink(page_size, page, request.query("textSearch") or None, sort_property, order)
