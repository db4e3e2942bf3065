"""Rule chains over REST, as ThingsBoard's ``RuleChainController`` (enough for tb-rest-client and the UI's export
files): ``POST /api/ruleChain``, ``POST /api/ruleChain/metadata``, ``GET /api/ruleChain/{id}[/metadata]``,
``GET /api/ruleChains``, ``POST /api/ruleChain/{id}/root``, ``DELETE /api/ruleChain/{id}``, and
``POST /api/ruleChain/import`` for a whole export file (``{"ruleChain", "metadata"}``).

Tenant administrators only; everything is scoped by the caller's tenant. Metadata is validated by the rule engine's
loader before it is stored (every problem listed in one 400: ``{"problems": [{"index", "name", "message"}]}``),
stored as the loader normalised it (legacy fields converted, node configurations upgraded), each node with its id.

A tenant that has no root chain stored runs ThingsBoard's default root chain (or the server's ``--rule-chain``).
That chain is shown here as the tenant's root chain, with a fixed id (:func:`default_root_id`), until the tenant
saves it (then it is stored under that id) or makes another chain its root. So, as in ThingsBoard, every tenant has
exactly one root chain to read, export and edit.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Final
from uuid import UUID

from nanoiot.errors import BadRequest, Conflict, InvalidArguments, NotFound, PermissionDenied
from nanoiot.persistence.records import Authority, PageLink, RuleChainRecord
from nanoiot.persistence.rule_store import CHAIN_NOT_FOUND, ROOT_DELETE_REFUSED, RuleStore
from nanoiot.web.access import require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.paging import page_link
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router
from nanoiot.validation import json_depth, shown, text, uuid_param

RULE_CHAIN_SORTS: Final = ("createdTime", "name", "root", "type")
CHAIN_TYPES: Final = ("CORE", "EDGE")
ANOTHER_ROOT: Final = "Another root rule chain is present in scope of current tenant!"
NAME_REQUIRED: Final = "Rule chain name should be specified!"
_NAMESPACE: Final = UUID("0b3f4c1e-5d2a-4e8b-9c61-7a2d9e4f1b30")


def default_root_id(tenant_id: UUID) -> UUID:
    """The id of a tenant's default root chain while it is not stored (the same on every node and restart)."""
    return uuid.uuid5(_NAMESPACE, f"root-rule-chain:{tenant_id}")


def node_id(chain_id: UUID, index: int) -> UUID:
    """A node's id in a chain that was never saved (the default root chain)."""
    return uuid.uuid5(chain_id, f"node:{index}")


def _eid(entity_type: str, value: Any) -> dict[str, str]:
    return {"entityType": entity_type, "id": str(value)}


def _node_uuid(node: Any) -> UUID | None:
    raw = node.get("id") if isinstance(node, dict) else None
    if isinstance(raw, dict):
        raw = raw.get("id")
    try:
        return UUID(str(raw)) if raw is not None else None
    except ValueError:
        return None


def first_node_id(metadata: Any) -> UUID | None:
    if not isinstance(metadata, dict):
        return None
    index, nodes = metadata.get("firstNodeIndex"), metadata.get("nodes") or []
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(nodes):
        return _node_uuid(nodes[index])
    return None


def default_root_record(tenant_id: UUID, export: dict[str, Any]) -> RuleChainRecord:
    """A tenant's default root chain (an export file's chain: ThingsBoard's default or ``--rule-chain``) as the
    record it would be once stored: the fixed id of :func:`default_root_id`, node ids of :func:`node_id`."""
    chain_id = default_root_id(tenant_id)
    fields = export.get("ruleChain") or {}
    metadata = copy.deepcopy(export.get("metadata") or {})
    metadata.pop("ruleChainId", None)
    for index, node in enumerate(metadata.get("nodes") or []):
        node["id"] = _eid("RULE_NODE", node_id(chain_id, index))
    return RuleChainRecord(chain_id, 0, tenant_id, str(fields.get("name") or "Root Rule Chain"),
                           str(fields.get("type") or "CORE"), True, bool(fields.get("debugMode")),
                           fields.get("configuration"), fields.get("additionalInfo"), metadata, 1)


# --- shapes -----------------------------------------------------------------------------------------------------------

def rule_chain_json(record: RuleChainRecord) -> dict[str, Any]:
    """ThingsBoard's ``RuleChain``."""
    first = first_node_id(record.metadata)
    return {
        "id": _eid("RULE_CHAIN", record.id),
        "createdTime": record.created_time,
        "additionalInfo": record.additional_info,
        "tenantId": _eid("TENANT", record.tenant_id),
        "name": record.name,
        "type": record.type,
        "firstRuleNodeId": _eid("RULE_NODE", first) if first else None,
        "root": record.root,
        "debugMode": record.debug_mode,
        "configuration": record.configuration,
        "externalId": None,
        "version": record.version,
    }


def metadata_json(record: RuleChainRecord) -> dict[str, Any]:
    """ThingsBoard's ``RuleChainMetaData``: every node with its ``id`` and ``ruleChainId``."""
    metadata = record.metadata if isinstance(record.metadata, dict) else {}
    chain = _eid("RULE_CHAIN", record.id)
    nodes = []
    for node in metadata.get("nodes") or []:
        shown = {"id": None, "createdTime": record.created_time, "ruleChainId": chain}
        shown.update({k: v for k, v in node.items() if k not in ("id", "ruleChainId", "createdTime")})
        node_uuid = _node_uuid(node)
        shown["id"] = _eid("RULE_NODE", node_uuid) if node_uuid else None
        shown.setdefault("externalId", None)
        nodes.append(shown)
    body: dict[str, Any] = {
        "ruleChainId": chain,
        "version": record.version,
        "firstNodeIndex": metadata.get("firstNodeIndex"),
        "nodes": nodes,
        "connections": list(metadata.get("connections") or []),
        "ruleChainConnections": None,
    }
    if metadata.get("notes"):
        body["notes"] = metadata["notes"]
    return body


def chain_export(record: RuleChainRecord, metadata: Any = None) -> dict[str, Any]:
    """The record as an export file (what the rule engine's loader reads)."""
    return {
        "ruleChain": {"name": record.name, "type": record.type, "root": record.root,
                      "debugMode": record.debug_mode, "configuration": record.configuration,
                      "additionalInfo": record.additional_info, "firstRuleNodeId": None},
        "metadata": copy.deepcopy(record.metadata if metadata is None else metadata) or {
            "firstNodeIndex": None, "nodes": [], "connections": [], "ruleChainConnections": None},
    }


def problems_error(exc: Any, what: str = "Rule chain") -> BadRequest:
    """The loader's ChainProblems as one 400 listing every problem."""
    problems = [{"index": getattr(p, "index", None), "name": getattr(p, "name", None),
                 "message": getattr(p, "message", str(p))} for p in getattr(exc, "problems", ())]
    if not problems:
        problems = [{"index": None, "name": None, "message": str(exc)}]
    summary = "; ".join(_problem_text(p) for p in problems)
    return BadRequest(f"{what} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}): {summary}",
                      problems=problems)


def _problem_text(problem: dict[str, Any]) -> str:
    where = []
    if problem["index"] is not None:
        where.append(f"node {problem['index']}")
    if problem["name"]:
        where.append(repr(problem["name"]))
    return f"{' '.join(where)}: {problem['message']}" if where else str(problem["message"])


def with_node_ids(metadata: dict[str, Any], keep: set[UUID]) -> dict[str, Any]:
    """Normalised metadata as stored: each node keeps its id if it was one of the chain's (``keep``), else gets a
    new one; ``ruleChainId``/``createdTime`` of nodes are not stored (they are the chain's)."""
    stored = copy.deepcopy(metadata)
    stored.pop("ruleChainId", None)
    stored.pop("version", None)
    nodes = []
    for node in stored.get("nodes") or []:
        node = {k: v for k, v in node.items() if k not in ("ruleChainId", "createdTime")}
        given = _node_uuid(node)
        node["id"] = _eid("RULE_NODE", given if given in keep else uuid.uuid4())
        nodes.append(node)
    stored["nodes"] = nodes
    stored.setdefault("connections", [])
    return stored


def _chain_type(body: dict[str, Any]) -> str:
    value = body.get("type") or "CORE"
    if not isinstance(value, str) or value not in CHAIN_TYPES:
        raise BadRequest(f"type: Invalid rule chain type '{shown(value)}': use CORE or EDGE")
    return str(value)


def _chain_name(body: dict[str, Any], field: str = "name") -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(NAME_REQUIRED)
    return text(field, name)  # type: ignore[return-value]


def _stored_json(body: dict[str, Any], *fields: str) -> None:
    for field in fields:
        json_depth(field, body.get(field))


def _id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _json_object(request: ApiRequest) -> dict[str, Any]:
    body = request.json_body()
    if not isinstance(body, dict):
        raise BadRequest("Invalid request body: expected a JSON object")
    return body


class RuleChainApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        self.store = RuleStore(context.repository)

    @property
    def rules(self) -> Any:
        """The server's RuleService (root-chain cache, --rule-chain); None where REST runs without one (tests)."""
        return getattr(self.context, "rules", None)

    def register(self, router: Router) -> None:
        router.add("POST", "/api/ruleChain", self.save_chain)
        router.add("POST", "/api/ruleChain/metadata", self.save_metadata)
        router.add("POST", "/api/ruleChain/import", self.import_chain)
        router.add("GET", "/api/ruleChains", self.list_chains)
        router.add("GET", "/api/ruleChain/{ruleChainId}", self.get_chain)
        router.add("GET", "/api/ruleChain/{ruleChainId}/metadata", self.get_metadata)
        router.add("POST", "/api/ruleChain/{ruleChainId}/root", self.set_root)
        router.add("DELETE", "/api/ruleChain/{ruleChainId}", self.delete_chain)

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _tenant(self, request: ApiRequest) -> UUID:
        require_authority(request.user, Authority.TENANT_ADMIN)
        return request.user.tenant_id

    def _load(self, export: dict[str, Any], chain_id: UUID | None) -> Any:
        from nanoiot.rules.chain import ChainProblems, load_chain

        registry = getattr(self.rules, "registry", None)
        try:
            return load_chain(export, registry, chain_id=chain_id)
        except ChainProblems as exc:
            raise problems_error(exc) from None

    def _default_export(self) -> dict[str, Any]:
        rules = self.rules
        if rules is not None:
            return rules.fallback_export()
        from nanoiot.rules.chain import default_root_chain

        chain = default_root_chain()
        return copy.deepcopy(getattr(chain, "export", chain))

    def default_root(self, tenant_id: UUID) -> RuleChainRecord:
        """The tenant's root chain while none is stored: the server's default, under its fixed id."""
        return default_root_record(tenant_id, self._default_export())

    async def _chain(self, tenant_id: UUID, raw_id: str, field: str = "ruleChainId") -> RuleChainRecord:
        """The tenant's chain (404 when missing, 403 when another tenant's), or its not-yet-stored default root."""
        chain_id = uuid_param(field, raw_id)
        record = await self.store.get_rule_chain(chain_id)
        if record is not None:
            if record.tenant_id != tenant_id:
                raise PermissionDenied()
            return record
        if chain_id == default_root_id(tenant_id) and await self.store.get_root(tenant_id) is None:
            return self.default_root(tenant_id)
        raise NotFound(CHAIN_NOT_FOUND)

    async def _stored(self, record: RuleChainRecord) -> RuleChainRecord:
        """A chain as stored: the default root chain is stored (as the tenant's root) the first time it changes."""
        if record.created_time != 0 or record.id != default_root_id(record.tenant_id):
            return record
        try:
            await self.store.create_rule_chain(record.tenant_id, record.name, record.type, record.debug_mode,
                                               record.configuration, record.additional_info, record.metadata,
                                               chain_id=record.id)
        except BadRequest:
            pass  # stored meanwhile by another request: use that one
        return await self.store.set_root(record.tenant_id, record.id)

    def _changed(self, tenant_id: UUID) -> None:
        rules = self.rules
        if rules is not None:
            rules.chains_changed(tenant_id)

    # --- handlers ---------------------------------------------------------------------------------------------------

    async def save_chain(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        body = _json_object(request)
        name = _chain_name(body)
        chain_type = _chain_type(body)
        _stored_json(body, "configuration", "additionalInfo")
        debug_mode = bool(body.get("debugMode") or False)
        version = body.get("version")
        expected = version if isinstance(version, int) and not isinstance(version, bool) else None
        existing_id = _id_of(body.get("id"))
        if existing_id is None:
            if body.get("root") is True:
                raise BadRequest(ANOTHER_ROOT)  # a tenant always has one (see the module's docstring)
            created = await self.store.create_rule_chain(tenant_id, name, chain_type, debug_mode,
                                                         body.get("configuration"), body.get("additionalInfo"))
            return rule_chain_json(created)
        record = await self._chain(tenant_id, existing_id, "id")
        if body.get("root") is True and not record.root:
            raise BadRequest(ANOTHER_ROOT)
        if record.root and chain_type != "CORE":
            raise BadRequest("The root rule chain must be of type CORE")
        if expected is not None and expected != record.version:
            raise Conflict("Rule chain was already changed by someone else; reload it and try again")
        record = await self._stored(record)
        updated = await self.store.update_rule_chain(tenant_id, record.id, name, chain_type, debug_mode,
                                                     body.get("configuration"), body.get("additionalInfo"))
        if updated.root:
            self._changed(tenant_id)
        return rule_chain_json(updated)

    async def save_metadata(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        body = _json_object(request)
        raw_id = _id_of(body.get("ruleChainId"))
        if raw_id is None:
            raise BadRequest("Rule chain metadata should have ruleChainId")
        record = await self._chain(tenant_id, raw_id, "ruleChainId")
        given = {k: v for k, v in body.items() if k not in ("ruleChainId", "version")}
        json_depth("metadata", given)
        loaded = self._load(chain_export(record, given), record.id)
        normalized = (getattr(loaded, "export", None) or {}).get("metadata") or given
        keep = {node_uuid for node in (record.metadata or {}).get("nodes") or []
                if (node_uuid := _node_uuid(node)) is not None}
        stored = with_node_ids(_align_ids(normalized, given), keep)
        record = await self._stored(record)
        saved = await self.store.save_metadata(tenant_id, record.id, stored)
        self._changed(tenant_id)
        return metadata_json(saved)

    async def import_chain(self, request: ApiRequest) -> dict[str, Any]:
        """A whole export file, validated as one (every problem listed), stored as a new non-root chain."""
        tenant_id = self._tenant(request)
        body = _json_object(request)
        json_depth("ruleChain export", body)
        loaded = self._load(body, None)
        export = getattr(loaded, "export", None) or body
        fields = export.get("ruleChain") or body.get("ruleChain") or {}
        name = _chain_name(fields, "ruleChain.name")
        metadata = with_node_ids(export.get("metadata") or {}, set())
        created = await self.store.create_rule_chain(
            tenant_id, name, _chain_type(fields), bool(fields.get("debugMode") or False),
            fields.get("configuration"), fields.get("additionalInfo"), metadata)
        return rule_chain_json(created)

    async def get_chain(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        return rule_chain_json(await self._chain(tenant_id, request.params["ruleChainId"]))

    async def get_metadata(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        return metadata_json(await self._chain(tenant_id, request.params["ruleChainId"]))

    async def list_chains(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        link = page_link(request, RULE_CHAIN_SORTS)
        chain_type = request.query("type") or None
        if chain_type is not None and chain_type not in CHAIN_TYPES:
            raise InvalidArguments(f"type: Invalid rule chain type '{shown(chain_type)}': use CORE or EDGE")
        virtual = None
        if chain_type in (None, "CORE") and await self.store.get_root(tenant_id) is None:
            candidate = self.default_root(tenant_id)
            if not link.text_search or link.text_search.lower() in candidate.name.lower():
                virtual = candidate
        if virtual is None:
            page = await self.store.list_rule_chains(tenant_id, link, chain_type)
            return _page_json(page.data, page.total_elements, link)
        # The default root chain is listed first; stored chains follow it, one place later.
        size = link.page_size
        if link.page == 0:
            page = await self.store.list_rule_chains(tenant_id, link, chain_type)
            return _page_json([virtual, *page.data[:size - 1]], page.total_elements + 1, link)
        start = link.page * size - 1  # index among the stored chains
        first = await self.store.list_rule_chains(
            tenant_id, PageLink(size, start // size, link.text_search, link.sort_property, link.sort_order),
            chain_type)
        window = first.data[start % size:]
        if start % size and first.has_next:
            second = await self.store.list_rule_chains(
                tenant_id, PageLink(size, start // size + 1, link.text_search, link.sort_property,
                                    link.sort_order), chain_type)
            window += second.data[:size - len(window)]
        return _page_json(window, first.total_elements + 1, link)

    async def set_root(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        record = await self._chain(tenant_id, request.params["ruleChainId"])
        if record.root:
            return rule_chain_json(record)
        if record.type != "CORE":
            raise BadRequest("Only a CORE rule chain can be the root rule chain")
        rooted = await self.store.set_root(tenant_id, record.id)
        self._changed(tenant_id)
        return rule_chain_json(rooted)

    async def delete_chain(self, request: ApiRequest) -> Response:
        tenant_id = self._tenant(request)
        record = await self._chain(tenant_id, request.params["ruleChainId"])
        if record.root:
            raise BadRequest(ROOT_DELETE_REFUSED)
        if not await self.store.delete_rule_chain(tenant_id, record.id):
            raise NotFound(CHAIN_NOT_FOUND)
        self._changed(tenant_id)
        return Response(body=NO_BODY)


def _align_ids(normalized: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The loader's normalised metadata with each node's id from the request (same index: the loader only ever
    appends nodes, for legacy rule chain connections)."""
    aligned = copy.deepcopy(normalized)
    given_nodes = given.get("nodes") or []
    for index, node in enumerate(aligned.get("nodes") or []):
        if index < len(given_nodes) and isinstance(given_nodes[index], dict) and "id" in given_nodes[index]:
            node["id"] = given_nodes[index]["id"]
    return aligned


def _page_json(data: list[RuleChainRecord], total: int, link: PageLink) -> dict[str, Any]:
    size = link.page_size
    return {
        "data": [rule_chain_json(record) for record in data],
        "totalPages": -(-total // size) if size else 0,
        "totalElements": total,
        "hasNext": (link.page + 1) * size < total,
    }

