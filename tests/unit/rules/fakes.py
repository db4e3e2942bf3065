"""Fakes for rule-engine tests: a recording RuleContext on task.Clock, a reactor stand-in for the script threads,
and small builders for messages, nodes and chain exports. No reactor, no database, no network."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from nanoiot.rpc.model import RpcResult
from nanoiot.rules.message import EntityId, RuleMessage
from nanoiot.rules.nodes.base import NodeSpec

T0 = 1_700_000_000.0
TENANT = UUID("00000000-0000-0000-0000-00000000000a")
CUSTOMER = UUID("00000000-0000-0000-0000-00000000000c")
CHAIN = UUID("00000000-0000-0000-0000-0000000000c1")
NODE = UUID("00000000-0000-0000-0000-0000000000d1")
DEVICE = EntityId("DEVICE", UUID("00000000-0000-0000-0000-0000000000de"))
ASSET = EntityId("ASSET", UUID("00000000-0000-0000-0000-0000000000a5"))


def message(type: str = "POST_TELEMETRY_REQUEST", data: Any = None, metadata: dict[str, str] | None = None,
            originator: EntityId = DEVICE, **fields: Any) -> RuleMessage:
    return RuleMessage.create(type, originator, {} if data is None else data, metadata or {}, **fields)


def build(node_class: Any, config: dict[str, Any] | None = None, name: str = "node",
          chain_id: UUID = CHAIN) -> Any:
    """A node built directly from a spec (what load_chain does for each node, without the chain)."""
    spec = NodeSpec(index=0, id=NODE, type=getattr(node_class, "type", "test"), name=name,
                    configuration=dict(config or {}), chain_id=chain_id)
    return node_class(spec)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (raises its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def relations(outputs: list[tuple[str, RuleMessage]]) -> list[str]:
    return [relation for relation, _ in outputs]


def node_entry(type: str, name: str, configuration: Any = None, **extra: Any) -> dict[str, Any]:
    entry = {"type": type, "name": name, "configuration": {} if configuration is None else configuration}
    entry.update(extra)
    return entry


def chain_export(nodes: list[dict[str, Any]], connections: list[tuple[int, int, str]], first: int | None = 0,
                 name: str = "Test Chain") -> dict[str, Any]:
    return {
        "ruleChain": {"name": name, "type": "CORE", "root": False, "firstRuleNodeId": None, "debugMode": False},
        "metadata": {"firstNodeIndex": first, "nodes": nodes,
                     "connections": [{"fromIndex": f, "toIndex": t, "type": label} for f, t, label in connections]},
    }


@dataclass
class RpcSent:
    """One send_rpc call, with the Deferred the test answers."""

    msg: RuleMessage
    device_id: UUID
    method: str
    params: Any
    oneway: bool
    persistent: bool
    expiration_time: int
    retries: int | None
    request_uuid: UUID | None
    additional_info: Any
    rule_chain_id: UUID
    rule_node_id: UUID
    answer: Deferred[RpcResult] = field(repr=False)


@dataclass(frozen=True)
class Relation:
    from_: EntityId
    to: EntityId
    type: str


class FakeContext:
    """A RuleContext that records what nodes ask for; the test answers RPCs and HTTP requests itself."""

    def __init__(self, clock: task.Clock | None = None, scripts: Any = None, tenant_id: UUID = TENANT) -> None:
        self.clock = clock or task.Clock()
        if clock is None:
            self.clock.advance(T0)
        self.tenant_id = tenant_id
        self.scripts = scripts
        self.rpcs: list[RpcSent] = []
        self.replies: list[tuple[UUID, int, str, str]] = []
        self.sessions_open = True
        self.relations: set[Relation] = set()
        self.entities: dict[tuple[str, str], EntityId] = {}
        self.customers: dict[EntityId, UUID] = {}
        self.http_calls: list[tuple[str, str, dict[str, str], bytes | None, float]] = []
        #: (method, url, headers, body, timeout) -> Deferred of (status, reason, headers, body)
        self.http_handler: Callable[..., Deferred[Any]] = lambda *a: succeed((200, "OK", {}, b"{}"))
        self.chains: dict[UUID, Callable[[RuleMessage], Deferred[Any]]] = {}
        self.lines: list[str] = []

    # --- RPC -----------------------------------------------------------------------------------------------------

    def send_rpc(self, msg: RuleMessage, device_id: UUID, method: str, params: Any, oneway: bool, persistent: bool,
                 expiration_time: int, retries: int | None, request_uuid: UUID | None, additional_info: Any,
                 rule_chain_id: UUID, rule_node_id: UUID) -> Deferred[RpcResult]:
        answer: Deferred[RpcResult] = Deferred()
        self.rpcs.append(RpcSent(msg, device_id, method, params, oneway, persistent, expiration_time, retries,
                                 request_uuid, additional_info, rule_chain_id, rule_node_id, answer))
        return answer

    def reply_to_device(self, msg: RuleMessage, device_id: UUID, request_id: int, session_ref: str,
                        body: str) -> bool:
        self.replies.append((device_id, request_id, session_ref, body))
        return self.sessions_open

    # --- relations and entities ----------------------------------------------------------------------------------

    def relate(self, from_: EntityId, to: EntityId, type: str = "Contains") -> None:
        self.relations.add(Relation(from_, to, type))

    def find_related(self, entity: EntityId, direction: str, relation_type: str, max_level: int,
                     entity_types: list[str]) -> Deferred[list[EntityId]]:
        found: list[EntityId] = []
        level = [entity]
        for _ in range(max(1, max_level)):
            next_level = []
            for current in level:
                for r in sorted(self.relations, key=lambda r: (str(r.from_.id), str(r.to.id))):
                    if relation_type and r.type != relation_type:
                        continue
                    if direction == "FROM" and r.from_ == current:
                        next_level.append(r.to)
                    elif direction == "TO" and r.to == current:
                        next_level.append(r.from_)
            found.extend(e for e in next_level if not entity_types or e.entity_type in entity_types)
            level = next_level
        return succeed(found)

    def relation_exists(self, from_: EntityId, to: EntityId | None, relation_type: str,
                        to_type: str | None) -> Deferred[bool]:
        return succeed(any(r.from_ == from_ and r.type == relation_type and (to is None or r.to == to)
                           and (to_type is None or r.to.entity_type == to_type) for r in self.relations))

    def create_relation(self, from_: EntityId, to: EntityId, relation_type: str) -> Deferred[None]:
        self.relations.add(Relation(from_, to, relation_type))
        return succeed(None)

    def remove_relations(self, entity: EntityId, direction: str, relation_type: str) -> Deferred[None]:
        self.relations = {r for r in self.relations if not (
            r.type == relation_type and (r.from_ if direction == "FROM" else r.to) == entity)}
        return succeed(None)

    def find_entity_by_name(self, entity_type: str, name: str) -> Deferred[EntityId | None]:
        return succeed(self.entities.get((entity_type, name)))

    def customer_of(self, entity: EntityId) -> Deferred[UUID | None]:
        return succeed(self.customers.get(entity))

    # --- HTTP, chains, log ---------------------------------------------------------------------------------------

    def http_request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                     timeout: float) -> Deferred[tuple[int, str, dict[str, str], bytes]]:
        self.http_calls.append((method, url, headers, body, timeout))
        return self.http_handler(method, url, headers, body, timeout)

    def run_chain(self, chain_id: UUID, msg: RuleMessage) -> Deferred[list[tuple[str, RuleMessage]]]:
        runner = self.chains.get(chain_id)
        if runner is None:
            return fail(LookupError(f"no rule chain {chain_id}"))
        return runner(msg)

    def log(self, text: str) -> None:
        self.lines.append(text)


class ThreadedCalls:
    """Stands in for the reactor of a ScriptRunner: worker threads hand results over with callFromThread, and the
    test thread runs them, waiting on a queue (with a timeout, never a sleep)."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args, kwargs))

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for the script threads")
            try:
                f, args, kwargs = self.calls.get(timeout=remaining)
            except queue.Empty:
                continue
            f(*args, **kwargs)

    def wait(self, d: Deferred[Any], timeout: float = 10.0) -> Any:
        """Run handed-over calls until ``d`` fires; its result (or a Failure)."""
        results: list[Any] = []
        d.addBoth(results.append)
        self.run_until(lambda: bool(results), timeout)
        return results[0]
