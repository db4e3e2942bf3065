"""Secrets kept out of access logs: the device token in ``/api/v1/{token}/...`` (and CoAP's same path), and
``token`` / ``accessToken`` / ``password`` query values (the WebSocket's JWT, a device's new token)."""

from __future__ import annotations

import re
from typing import Any

from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

MASK = b"***"
_DEVICE_PATH = re.compile(rb"^(/api/v1/)[^/?#]+")
_SECRET_QUERY = re.compile(rb"([?&](?:token|accesstoken|access_token|password|activatetoken)=)[^&#]*", re.IGNORECASE)


def mask_uri(uri: bytes) -> bytes:
    """``uri`` with every secret replaced by ``***``."""
    masked = _DEVICE_PATH.sub(lambda m: m.group(1) + MASK, uri)
    return _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, masked)


def mask_path(path: str) -> str:
    """:func:`mask_uri` for a text path (CoAP's ``api/v1/{token}/rpc``, with or without the leading slash)."""
    text = path if path.startswith("/") else "/" + path
    masked = mask_uri(text.encode("utf-8", "replace")).decode("utf-8", "replace")
    return masked if path.startswith("/") else masked[1:]


class _MaskedRequest:
    """The request as the access-log formatter sees it: the same, but its URI masked."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = mask_uri(request.uri or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@provider(IAccessLogFormatter)
def masked_log_formatter(timestamp: str, request: Any) -> str:
    """Twisted's combined log line, secrets masked (``Site(logFormatter=...)``)."""
    return combinedLogFormatter(timestamp, _MaskedRequest(request))
