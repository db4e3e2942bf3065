"""ThingsBoard's paging query parameters, validated with errors that name the bad value."""

from __future__ import annotations

from typing import Final

from nanoiot.errors import InvalidArguments
from nanoiot.persistence.records import PageLink, SortOrder
from nanoiot.web.routing import ApiRequest
from nanoiot.validation import int_param, shown, text

#: The largest page a client may ask for (ThingsBoard sets none; a bound keeps one request's memory bounded).
MAX_PAGE_SIZE: Final = 10_000
#: The largest page number: its offset (page * pageSize) stays far inside a BIGINT on both databases.
MAX_PAGE: Final = 2**31 - 1


def _int_param(request: ApiRequest, name: str, minimum: int, maximum: int) -> int:
    raw = request.query(name)
    if raw is None:
        raise InvalidArguments(f"Required request parameter '{name}' is not present")
    return int_param(name, raw, minimum, maximum)


def page_link(request: ApiRequest, sort_properties: tuple[str, ...]) -> PageLink:
    page_size = _int_param(request, "pageSize", 1, MAX_PAGE_SIZE)
    page = _int_param(request, "page", 0, MAX_PAGE)
    sort_property = request.query("sortProperty") or None
    if sort_property is not None and sort_property not in sort_properties:
        allowed = ", ".join(sort_properties)
        raise InvalidArguments(f"Invalid sortProperty '{shown(sort_property)}': use one of {allowed}")
    raw_order = (request.query("sortOrder") or "ASC").upper()
    try:
        order = SortOrder(raw_order)
    except ValueError:
        raise InvalidArguments(f"Invalid sortOrder '{shown(raw_order)}': use ASC or DESC") from None
    text_search = text("textSearch", request.query("textSearch")) or None
    return PageLink(page_size, page, text_search, sort_property, order)

