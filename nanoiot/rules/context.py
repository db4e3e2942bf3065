"""What rule nodes may do outside themselves: the server implements :class:`RuleContext`; tests use fakes.

Every call returns a Deferred (or a plain value where it cannot wait), so that no node ever blocks the reactor or
a device actor. The engine hands each node a :class:`NodeContext`: the server's context plus the engine's own
resources (the script runner).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from nanoiot.rpc.model import RpcResult
from nanoiot.rules.message import EntityId, RuleMessage

__all__ = ["NodeContext", "RuleContext", "Scripts"]


@runtime_checkable
class RuleContext(Protocol):
    """The server's side of a rule chain, one per tenant."""

    clock: IReactorTime
    tenant_id: UUID

    def send_rpc(self, msg: RuleMessage, device_id: UUID, method: str, params: Any, oneway: bool, persistent: bool,
                 expiration_time: int, retries: int | None, request_uuid: UUID | None, additional_info: Any,
                 rule_chain_id: UUID, rule_node_id: UUID) -> Deferred[RpcResult]:
        """Send a command through the command service (RPC Call Request). Fires with how it ended; errbacks with
        a NanoError (NotFound, PermissionDenied, ...) for a command refused before it was sent. ``request_uuid``
        None: the service picks one. ``msg.origin`` tells whether a REST caller waits for the answer."""
        ...

    def reply_to_device(self, msg: RuleMessage, device_id: UUID, request_id: int, session_ref: str,
                        body: str) -> bool:
        """Answer a device-to-server call (RPC Call Reply) on the session that made it (metadata ``sessionId``).
        False: that session is gone, the answer was not delivered."""
        ...

    def find_related(self, entity: EntityId, direction: str, relation_type: str, max_level: int,
                     entity_types: list[str]) -> Deferred[list[EntityId]]:
        """Entities related to ``entity``: ``direction`` "FROM" follows relations from it, "TO" relations to it;
        ``relation_type`` "" means any type; ``entity_types`` empty means any type."""
        ...

    def relation_exists(self, from_: EntityId, to: EntityId | None, relation_type: str,
                        to_type: str | None) -> Deferred[bool]:
        """Whether ``from_`` has a relation of that type to ``to`` (None: to any entity, of type ``to_type`` if
        given)."""
        ...

    def create_relation(self, from_: EntityId, to: EntityId, relation_type: str) -> Deferred[None]: ...

    def remove_relations(self, entity: EntityId, direction: str, relation_type: str) -> Deferred[None]:
        """Remove the relations of that type from (``direction`` "FROM") or to ("TO") ``entity``."""
        ...

    def find_entity_by_name(self, entity_type: str, name: str) -> Deferred[EntityId | None]:
        """The tenant's entity of that type with that name (a USER by email, a CUSTOMER or DASHBOARD by title)."""
        ...

    def customer_of(self, entity: EntityId) -> Deferred[UUID | None]: ...

    def http_request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                     timeout: float) -> Deferred[tuple[int, str, dict[str, str], bytes]]:
        """An outgoing HTTP request (REST API call node): (status, reason, headers, body). The server applies its
        own policy (e.g. which addresses may be called)."""
        ...

    def run_chain(self, chain_id: UUID, msg: RuleMessage) -> Deferred[list[tuple[str, RuleMessage]]]:
        """Run the tenant's chain ``chain_id`` (Rule Chain input node); fires with what its Output nodes emitted
        (relation = the output node's name). Errbacks if there is no such chain."""
        ...

    def log(self, text: str) -> None:
        """The Log node's line (ThingsBoard logs it at INFO)."""
        ...


class Scripts(Protocol):
    """What script nodes need of a script runner (:class:`nanoiot.rules.scripts.ScriptRunner`)."""

    def run(self, script: Any, msg: Any, metadata: Any, msg_type: str) -> Deferred[Any]: ...


class NodeContext:
    """What a node sees while it handles one message: the server's :class:`RuleContext`, plus ``scripts``.

    Plain delegation, spelled out so that type checkers see each method; ``rules`` is the server's context itself,
    for a plugin node that needs more of it.
    """

    __slots__ = ("rules", "scripts")

    def __init__(self, rules: RuleContext, scripts: Scripts) -> None:
        self.rules = rules
        self.scripts = scripts

    @property
    def clock(self) -> IReactorTime:
        return self.rules.clock

    @property
    def tenant_id(self) -> UUID:
        return self.rules.tenant_id

    def send_rpc(self, msg: RuleMessage, device_id: UUID, method: str, params: Any, oneway: bool, persistent: bool,
                 expiration_time: int, retries: int | None, request_uuid: UUID | None, additional_info: Any,
                 rule_chain_id: UUID, rule_node_id: UUID) -> Deferred[RpcResult]:
        return self.rules.send_rpc(msg, device_id, method, params, oneway, persistent, expiration_time, retries,
                                   request_uuid, additional_info, rule_chain_id, rule_node_id)

    def reply_to_device(self, msg: RuleMessage, device_id: UUID, request_id: int, session_ref: str,
                        body: str) -> bool:
        return self.rules.reply_to_device(msg, device_id, request_id, session_ref, body)

    def find_related(self, entity: EntityId, direction: str, relation_type: str, max_level: int,
                     entity_types: list[str]) -> Deferred[list[EntityId]]:
        return self.rules.find_related(entity, direction, relation_type, max_level, entity_types)

    def relation_exists(self, from_: EntityId, to: EntityId | None, relation_type: str,
                        to_type: str | None) -> Deferred[bool]:
        return self.rules.relation_exists(from_, to, relation_type, to_type)

    def create_relation(self, from_: EntityId, to: EntityId, relation_type: str) -> Deferred[None]:
        return self.rules.create_relation(from_, to, relation_type)

    def remove_relations(self, entity: EntityId, direction: str, relation_type: str) -> Deferred[None]:
        return self.rules.remove_relations(entity, direction, relation_type)

    def find_entity_by_name(self, entity_type: str, name: str) -> Deferred[EntityId | None]:
        return self.rules.find_entity_by_name(entity_type, name)

    def customer_of(self, entity: EntityId) -> Deferred[UUID | None]:
        return self.rules.customer_of(entity)

    def http_request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                     timeout: float) -> Deferred[tuple[int, str, dict[str, str], bytes]]:
        return self.rules.http_request(method, url, headers, body, timeout)

    def run_chain(self, chain_id: UUID, msg: RuleMessage) -> Deferred[list[tuple[str, RuleMessage]]]:
        return self.rules.run_chain(chain_id, msg)

    def log(self, text: str) -> None:
        self.rules.log(text)
