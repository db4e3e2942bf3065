"""ThingsBoard's ``${metadataKey}`` / ``$[data.path]`` substitution (TbNodeUtils.processPattern), as pure functions.

Rules, as ThingsBoard applies them:
- ``${*}`` is the whole metadata as JSON, ``${key}`` one metadata value; unknown keys stay as written.
- ``$[*]`` is the whole data as JSON; ``$[a.b]`` walks JSON objects by key and is replaced only when it ends on a
  value (string, number, boolean, null), never on an object or array; otherwise it stays as written.
- ``escape_json`` (the REST API call node's body template) escapes substituted values for use inside a JSON string.

One leniency: data that is not JSON leaves ``$[...]`` untouched (ThingsBoard throws "Failed to process pattern!").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from nanoiot.rules.message import RuleMessage, compact_json

__all__ = ["process_pattern", "process_template", "value_text"]

_DATA_PATTERN = re.compile(r"\$\[(.*?)]")
_NOT_JSON = object()


def value_text(value: Any) -> str:
    """A JSON value node as Jackson's ``asText()`` writes it."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return json.dumps(value)


def _escape(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def process_template(template: str, values: Mapping[str, str], escape_json: bool = False) -> str:
    """Replace every ``${key}`` of ``values`` in ``template``."""
    if "${" not in template:
        return template
    result = template
    for key, value in values.items():
        result = result.replace("${" + key + "}", _escape(value) if escape_json else value)
    return result


def process_pattern(pattern: str, msg: RuleMessage, escape_json: bool = False) -> str:
    """``pattern`` with the message's metadata and data substituted (see the module docstring)."""
    result = pattern
    if "${" in result:
        metadata = msg.metadata
        result = result.replace("${*}", compact_json(dict(metadata)) if metadata else "{}")
        result = process_template(result, metadata, escape_json)
    if "$[" not in result:
        return result
    data = _parse(msg.data)
    if "$[*]" in result:
        result = result.replace("$[*]", msg.data if data is _NOT_JSON else compact_json(data))
    if not isinstance(data, dict):
        return result
    for path in _DATA_PATTERN.findall(result):
        node: Any = data
        for key in path.split("."):
            if not key or not isinstance(node, dict) or key not in node:
                node = _NOT_JSON
                break
            node = node[key]
        if node is _NOT_JSON or isinstance(node, (dict, list)):
            continue
        text = value_text(node)
        result = result.replace("$[" + path + "]", _escape(text) if escape_json else text)
    return result


def _parse(data: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, TypeError):
        return _NOT_JSON
