"""Entity relations over REST, as ThingsBoard's ``EntityRelationController``: ``POST /api/relation``,
``GET /api/relation`` (one), ``GET /api/relations`` (by ``fromId``/``fromType`` or ``toId``/``toType``, optionally
of one ``relationType``), ``DELETE /api/relation`` (one) and ``DELETE /api/relations`` (all of an entity).

Tenant administrators only. Both ends must be entities of the caller's tenant that exist here (devices, customers,
users, rule chains, the tenant itself); NanoIoT keeps no assets, dashboards or other entity kinds, so those are
"not found" (400 for an entity type ThingsBoard does not know at all).
"""

from __future__ import annotations

import re
from typing import Any, Final
from uuid import UUID

from nanoiot.errors import BadRequest, InvalidArguments, NotFound, PermissionDenied
from nanoiot.persistence.records import Authority, RelationRecord
from nanoiot.persistence.rule_store import COMMON, FROM, TO, RuleStore
from nanoiot.web.access import require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router
from nanoiot.validation import json_depth, json_object, shown, text, uuid_param

#: ThingsBoard's EntityType names (a relation end of any other type is a 400).
ENTITY_TYPES: Final = frozenset("""
    TENANT CUSTOMER USER DASHBOARD ASSET DEVICE ALARM RULE_CHAIN RULE_NODE ENTITY_VIEW WIDGETS_BUNDLE WIDGET_TYPE
    TENANT_PROFILE DEVICE_PROFILE ASSET_PROFILE API_USAGE_STATE TB_RESOURCE OTA_PACKAGE EDGE RPC QUEUE
    NOTIFICATION_TARGET NOTIFICATION_TEMPLATE NOTIFICATION_REQUEST NOTIFICATION NOTIFICATION_RULE QUEUE_STATS
    OAUTH2_CLIENT DOMAIN MOBILE_APP MOBILE_APP_BUNDLE CALCULATED_FIELD JOB ADMIN_SETTINGS AI_MODEL API_KEY
""".split())
_TYPE_GROUP = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
RELATION_NOT_FOUND: Final = "Requested item wasn't found!"


def relation_json(relation: RelationRecord) -> dict[str, Any]:
    """ThingsBoard's ``EntityRelation``."""
    return {
        "from": {"entityType": relation.from_type, "id": str(relation.from_id)},
        "to": {"entityType": relation.to_type, "id": str(relation.to_id)},
        "type": relation.type,
        "typeGroup": relation.type_group,
        "additionalInfo": relation.additional_info,
    }


def _entity_type(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArguments(f"Required request parameter '{name}' is not present")
    entity_type = value.strip().upper()
    if entity_type not in ENTITY_TYPES:
        raise BadRequest(f"{name}: Invalid entity type '{shown(value)}'")
    return entity_type


def _type_group(value: Any) -> str:
    if value is None or value == "":
        return COMMON
    if not isinstance(value, str) or not _TYPE_GROUP.match(value):
        raise BadRequest(f"Invalid relation type group '{shown(value)}'")
    return value


def _relation_type(value: Any, field: str = "type") -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("Relation type should be specified!")
    return text(field, value)  # type: ignore[return-value]


class RelationApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        self.store = RuleStore(context.repository)

    def register(self, router: Router) -> None:
        router.add("POST", "/api/relation", self.save)
        router.add("GET", "/api/relation", self.get_one)
        router.add("DELETE", "/api/relation", self.delete_one)
        router.add("GET", "/api/relations", self.find)
        router.add("DELETE", "/api/relations", self.delete_all)

    # --- entities ---------------------------------------------------------------------------------------------------

    def _tenant(self, request: ApiRequest) -> UUID:
        require_authority(request.user, Authority.TENANT_ADMIN)
        return request.user.tenant_id

    async def _entity(self, tenant_id: UUID, entity_type: str, entity_id: UUID) -> tuple[str, UUID]:
        """The entity, checked: it exists (404) and belongs to the tenant (403)."""
        owner: UUID | None
        if entity_type == "TENANT":
            owner = entity_id if entity_id == tenant_id else None
            if owner is None:
                raise PermissionDenied()
        elif entity_type == "DEVICE":
            device = await self.context.catalog.get_device(entity_id)
            owner = device.tenant_id if device is not None else None
        elif entity_type == "CUSTOMER":
            customer = await self.context.repository.get_customer(entity_id)
            owner = customer.tenant_id if customer is not None else None
        elif entity_type == "USER":
            user = await self.context.repository.get_user(entity_id)
            owner = user.tenant_id if user is not None else None
        elif entity_type == "RULE_CHAIN":
            chain = await self.store.get_rule_chain(entity_id)
            owner = chain.tenant_id if chain is not None else None
        else:
            owner = None
        if owner is None:
            raise NotFound(f"{entity_type} with id {entity_id} wasn't found!")
        if owner != tenant_id:
            raise PermissionDenied()
        return entity_type, entity_id

    async def _entity_of(self, tenant_id: UUID, raw: Any, what: str) -> tuple[str, UUID]:
        if not isinstance(raw, dict):
            raise BadRequest(f"Relation '{what}' should be an entity id {{\"entityType\", \"id\"}}")
        entity_type = _entity_type(raw.get("entityType"), f"{what}.entityType")
        return await self._entity(tenant_id, entity_type, uuid_param(f"{what}.id", raw.get("id")))

    async def _query_entity(self, request: ApiRequest, tenant_id: UUID, prefix: str) -> tuple[str, UUID] | None:
        raw_id, raw_type = request.query(f"{prefix}Id"), request.query(f"{prefix}Type")
        if raw_id is None and raw_type is None:
            return None
        if raw_id is None:
            raise InvalidArguments(f"Required request parameter '{prefix}Id' is not present")
        entity_id = uuid_param(f"{prefix}Id", raw_id)
        entity_type = _entity_type(raw_type, f"{prefix}Type")
        return await self._entity(tenant_id, entity_type, entity_id)

    async def _both_ends(self, request: ApiRequest, tenant_id: UUID) -> tuple[tuple[str, UUID], tuple[str, UUID],
                                                                                str, str]:
        from_ = await self._query_entity(request, tenant_id, "from")
        to = await self._query_entity(request, tenant_id, "to")
        if from_ is None:
            raise InvalidArguments("Required request parameter 'fromId' is not present")
        if to is None:
            raise InvalidArguments("Required request parameter 'toId' is not present")
        relation_type = request.query("relationType")
        if relation_type is None:
            raise InvalidArguments("Required request parameter 'relationType' is not present")
        return from_, to, _relation_type(relation_type, "relationType"), \
            _type_group(request.query("relationTypeGroup"))

    # --- handlers ---------------------------------------------------------------------------------------------------

    async def save(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        body = json_object(request.json_body())
        relation_type = _relation_type(body.get("type"))
        additional_info = json_depth("additionalInfo", body.get("additionalInfo"))
        from_ = await self._entity_of(tenant_id, body.get("from"), "from")
        to = await self._entity_of(tenant_id, body.get("to"), "to")
        relation = RelationRecord(tenant_id, from_[1], from_[0], to[1], to[0], relation_type,
                                  _type_group(body.get("typeGroup")), additional_info)
        return relation_json(await self.store.save_relation(relation))

    async def get_one(self, request: ApiRequest) -> dict[str, Any]:
        tenant_id = self._tenant(request)
        from_, to, relation_type, group = await self._both_ends(request, tenant_id)
        found = await self.store.get_relation(tenant_id, from_[1], from_[0], to[1], to[0], relation_type, group)
        if found is None:
            raise NotFound(RELATION_NOT_FOUND)
        return relation_json(found)

    async def delete_one(self, request: ApiRequest) -> Response:
        tenant_id = self._tenant(request)
        from_, to, relation_type, group = await self._both_ends(request, tenant_id)
        if not await self.store.delete_relation(tenant_id, from_[1], from_[0], to[1], to[0], relation_type, group):
            raise NotFound(RELATION_NOT_FOUND)
        return Response(body=NO_BODY)

    async def find(self, request: ApiRequest) -> list[dict[str, Any]]:
        """By ``fromId``/``fromType`` or by ``toId``/``toType``, optionally ``relationType``; ``relationTypeGroup``
        defaults to COMMON."""
        tenant_id = self._tenant(request)
        from_ = await self._query_entity(request, tenant_id, "from")
        to = await self._query_entity(request, tenant_id, "to") if from_ is None else None
        if from_ is None and to is None:
            raise InvalidArguments("Required request parameter 'fromId' (or 'toId') is not present")
        direction, (entity_type, entity_id) = (FROM, from_) if from_ is not None else (TO, to)  # type: ignore[misc]
        relation_type = request.query("relationType")
        found = await self.store.list_relations(tenant_id, entity_id, entity_type, direction,
                                                _relation_type(relation_type, "relationType")
                                                if relation_type is not None else None,
                                                _type_group(request.query("relationTypeGroup")))
        return [relation_json(r) for r in found]

    async def delete_all(self, request: ApiRequest) -> Response:
        """Every COMMON relation from and to ``entityId``/``entityType``."""
        tenant_id = self._tenant(request)
        raw_id = request.query("entityId")
        if raw_id is None:
            raise InvalidArguments("Required request parameter 'entityId' is not present")
        entity_id = uuid_param("entityId", raw_id)
        entity_type = _entity_type(request.query("entityType"), "entityType")
        entity = await self._entity(tenant_id, entity_type, entity_id)
        await self.store.delete_entity_relations(tenant_id, entity[1], entity[0], type_group=COMMON)
        return Response(body=NO_BODY)
