"""The rule chain and relation REST APIs in memory: treq's StubTreq over the real resource tree of ``build_site``, a
real TokenIssuer, and the real RuleStore on an in-memory SQLite database whose queries run synchronously (no thread
pool: ``SyncRepository`` below), so every request completes inside ``StubTreq.flush``. No sockets, no reactor."""

from __future__ import annotations

import copy
import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy.engine import make_url
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from nanoiot.config import Config
from nanoiot.persistence import schema
from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.records import NULL_UUID, Authority, User
from nanoiot.persistence.repository import Repository, _create_engine
from nanoiot.persistence.rule_store import ROOT_DELETE_REFUSED
from nanoiot.rules.chain import default_root_chain
from nanoiot.web.context import WebContext
from nanoiot.web.rule_chains import ANOTHER_ROOT, default_root_id
from nanoiot.web.site import build_site
from nanoiot.web.tokens import TokenIssuer
from tests.fixtures.untouched import Untouched

T0 = 1_700_000_000
KEY = b"unit-test-signing-key-" * 3
TENANT, OTHER_TENANT = uuid4(), uuid4()

LOG_NODE = {"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log",
            "configuration": {"jsScript": "return 'seen: ' + msgType;"}, "additionalInfo": {"layoutX": 1}}
SWITCH_NODE = {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch",
               "configuration": {"version": 0}}
RPC_NODE = {"type": "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode", "name": "rpc",
            "configuration": {"timeoutInSeconds": 60}}
#: The spec's RpcResponseRuleChainMetadata (ThingsBoard's black-box tests): legacy style, JS without scriptLang.
REPLY_CHAIN = {
    "ruleChain": {"name": "RPC reply", "type": "CORE", "root": False, "debugMode": False,
                  "configuration": None, "additionalInfo": {"description": "answers getResponse"}},
    "metadata": {
        "firstNodeIndex": 0,
        "nodes": [
            SWITCH_NODE,
            {"type": "org.thingsboard.rule.engine.transform.TbTransformMsgNode", "name": "formResponse",
             "configuration": {"jsScript": "if (msg.method == \"getResponse\") {\n    return {msg: {\"response\": "
                                           "\"requestReceived\"}, metadata: metadata, msgType: msgType};\n}\n\n"
                                           "return {msg: msg, metadata: metadata, msgType: msgType};"}},
            {"type": "org.thingsboard.rule.engine.rpc.TbSendRPCReplyNode", "name": "rpcReply",
             "configuration": {"requestIdMetaDataAttribute": "requestId"}},
        ],
        "connections": [{"fromIndex": 0, "toIndex": 1, "type": "RPC Request from Device"},
                        {"fromIndex": 1, "toIndex": 2, "type": "Success"},
                        {"fromIndex": 1, "toIndex": 2, "type": "Failure"}],
        "ruleChainConnections": None,
    },
}


class SyncRepository(Repository):
    """The real repository on an in-memory SQLite database, each query run at once on the calling thread (as
    Buildbot's tests run their pool synchronously): its Deferreds have fired when a call returns."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__("sqlite://", reactor=clock)

    def start(self) -> Deferred[None]:
        self._engine = _create_engine(make_url("sqlite://"), 1)
        with self._engine.begin() as conn:
            schema.upgrade(conn)
        self._pool = object()  # type: ignore[assignment]  # "started"
        return succeed(None)

    def _run(self, fn: Any, attempts: int = 1) -> Deferred[Any]:
        assert self._engine is not None
        try:
            with self._engine.begin() as conn:
                return succeed(fn(conn))
        except Exception:
            return fail()

    def stop(self) -> Deferred[None]:
        if self._engine is not None:
            self._engine.dispose()
        return succeed(None)


class FakeRules:
    """The server's RuleService as the REST API sees it: the default root chain's export, and who was told that a
    tenant's chains changed."""

    def __init__(self, export: dict[str, Any] | None = None) -> None:
        self.export = export or default_root_chain()
        self.changed: list[UUID] = []

    def fallback_export(self) -> dict[str, Any]:
        return copy.deepcopy(self.export)

    def chains_changed(self, tenant_id: UUID) -> None:
        self.changed.append(tenant_id)




def user(authority: Authority, tenant: UUID = TENANT, customer: UUID = NULL_UUID) -> User:
    return User(uuid4(), 0, tenant, customer, f"{uuid4().hex[:6]}@nanoiot.io", authority, None, None, b"")


ADMIN = user(Authority.TENANT_ADMIN)
OTHER_ADMIN = user(Authority.TENANT_ADMIN, tenant=OTHER_TENANT)
CUSTOMER_USER = user(Authority.CUSTOMER_USER, customer=uuid4())
SYSADMIN = user(Authority.SYS_ADMIN, tenant=NULL_UUID)


class Api:
    def __init__(self, rules: Any = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.repository = SyncRepository(self.clock)
        self.repository.start()
        self.catalog = DeviceCatalog(self.repository)
        self.tokens = TokenIssuer(KEY, 9000, 604800, self.clock)
        self.rules = rules
        context = WebContext(config=Config(), clock=self.clock, repository=self.repository, catalog=self.catalog,
                             directory=Untouched("directory"), tokens=self.tokens,
                             commands=Untouched("commands"))  # type: ignore[arg-type]
        context.rules = rules  # type: ignore[attr-defined]
        self.stub = StubTreq(build_site(context).resource)
        self._jwts: dict[UUID, str] = {}

    def jwt(self, who: User) -> str:
        if who.id not in self._jwts:
            self._jwts[who.id] = self.tokens.issue(who)["token"]
        return self._jwts[who.id]

    def call(self, method: str, path: str, who: User | None = ADMIN, body: Any = None) -> tuple[int, Any]:
        headers = {b"Content-Type": [b"application/json"]}
        if who is not None:
            headers[b"X-Authorization"] = [f"Bearer {self.jwt(who)}".encode()]
        data = json.dumps(body).encode() if body is not None else None
        response = self._fired(self.stub.request(method, f"http://nanoiot.test{path}", data=data, headers=headers))
        content = self._fired(self.stub.content(response))
        return response.code, (json.loads(content) if content else b"")

    def _fired(self, d: Deferred) -> Any:
        self.stub.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "no response"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def ok(self, method: str, path: str, body: Any = None, who: User = ADMIN) -> Any:
        status, answer = self.call(method, path, who, body)
        assert status == 200, answer
        return answer

    def device(self, name: str, tenant: UUID = TENANT) -> UUID:
        results: list[Any] = []
        self.catalog.create_device(tenant, name).addCallback(results.append)
        return results[0][0].id

    def chain(self, name: str = "chain") -> dict[str, Any]:
        return self.ok("POST", "/api/ruleChain", {"name": name})


@pytest.fixture
def api() -> Any:
    api = Api(FakeRules())
    yield api
    api.repository.stop()


def metadata_of(chain: dict[str, Any], nodes: list[dict[str, Any]], connections: list[dict[str, Any]],
                first: int | None = 0) -> dict[str, Any]:
    return {"ruleChainId": chain["id"], "firstNodeIndex": first, "nodes": copy.deepcopy(nodes),
            "connections": connections, "ruleChainConnections": None}


# --- rule chains: the RuleChain shape ---------------------------------------------------------------------------------

def test_a_created_chain_has_thingsboards_rule_chain_shape(api):
    created = api.ok("POST", "/api/ruleChain", {"name": "Thermostats", "additionalInfo": {"description": "d"},
                                                "debugMode": True})
    assert set(created) >= {"id", "createdTime", "tenantId", "name", "type", "firstRuleNodeId", "root",
                            "debugMode", "configuration", "additionalInfo", "version"}
    assert created["id"]["entityType"] == "RULE_CHAIN" and UUID(created["id"]["id"])
    assert created["tenantId"] == {"entityType": "TENANT", "id": str(TENANT)}
    assert (created["name"], created["type"], created["root"], created["debugMode"]) == (
        "Thermostats", "CORE", False, True)
    assert (created["firstRuleNodeId"], created["version"], created["createdTime"]) == (None, 1, T0 * 1000)
    assert api.ok("GET", f"/api/ruleChain/{created['id']['id']}") == created


def test_a_chain_needs_a_name_and_a_known_type(api):
    status, error = api.call("POST", "/api/ruleChain", body={"name": " "})
    assert (status, error["message"]) == (400, "Rule chain name should be specified!")
    status, error = api.call("POST", "/api/ruleChain", body={"name": "x", "type": "FANCY"})
    assert status == 400 and "CORE or EDGE" in error["message"]
    status, error = api.call("POST", "/api/ruleChain", body=[1, 2])
    assert status == 400


def test_a_new_chain_cannot_claim_to_be_root(api):
    status, error = api.call("POST", "/api/ruleChain", body={"name": "x", "root": True})
    assert (status, error["message"]) == (400, ANOTHER_ROOT)


def test_saving_a_chain_with_its_id_updates_it_and_bumps_the_version(api):
    created = api.chain("a")
    updated = api.ok("POST", "/api/ruleChain", {**created, "name": "b", "additionalInfo": {"description": "x"}})
    assert (updated["id"], updated["name"], updated["version"]) == (created["id"], "b", 2)
    assert updated["additionalInfo"] == {"description": "x"}
    status, error = api.call("POST", "/api/ruleChain", body={**created, "name": "c"})  # version 1 is stale
    assert status == 409, error
    assert api.ok("GET", f"/api/ruleChain/{created['id']['id']}")["name"] == "b"


def test_only_tenant_admins_reach_rule_chains(api):
    created = api.chain()
    for who in (CUSTOMER_USER, SYSADMIN):
        assert api.call("GET", "/api/ruleChains?pageSize=10&page=0", who)[0] == 403
        assert api.call("POST", "/api/ruleChain", who, {"name": "x"})[0] == 403
        assert api.call("GET", f"/api/ruleChain/{created['id']['id']}", who)[0] == 403
    assert api.call("GET", "/api/ruleChains?pageSize=10&page=0", None)[0] == 401


def test_another_tenants_chain_is_forbidden_and_a_missing_one_not_found(api):
    created = api.chain()
    chain_id = created["id"]["id"]
    assert api.call("GET", f"/api/ruleChain/{chain_id}", OTHER_ADMIN)[0] == 403
    assert api.call("GET", f"/api/ruleChain/{chain_id}/metadata", OTHER_ADMIN)[0] == 403
    assert api.call("DELETE", f"/api/ruleChain/{chain_id}", OTHER_ADMIN)[0] == 403
    assert api.call("POST", f"/api/ruleChain/{chain_id}/root", OTHER_ADMIN)[0] == 403
    assert api.call("GET", f"/api/ruleChain/{uuid4()}")[0] == 404
    assert api.call("GET", "/api/ruleChain/not-a-uuid")[0] == 400


# --- the default root chain -------------------------------------------------------------------------------------------

def test_a_tenant_without_a_stored_root_sees_the_default_root_chain(api):
    page = api.ok("GET", "/api/ruleChains?pageSize=10&page=0")
    assert page["totalElements"] == 1
    [root] = page["data"]
    assert root["id"]["id"] == str(default_root_id(TENANT))
    assert (root["name"], root["root"], root["type"]) == ("Root Rule Chain", True, "CORE")
    metadata = api.ok("GET", f"/api/ruleChain/{root['id']['id']}/metadata")
    assert metadata["ruleChainId"] == root["id"]
    assert metadata["firstNodeIndex"] == 2 and len(metadata["nodes"]) == 6 and len(metadata["connections"]) == 5
    assert all(node["id"]["entityType"] == "RULE_NODE" and node["ruleChainId"] == root["id"]
               for node in metadata["nodes"])
    assert root["firstRuleNodeId"] == metadata["nodes"][2]["id"]
    assert metadata["ruleChainConnections"] is None
    assert api.ok("GET", f"/api/ruleChain/{root['id']['id']}") == root  # the same, read alone


def test_the_default_root_chain_follows_the_servers_rule_chain_file(api):
    api.rules.export = copy.deepcopy(REPLY_CHAIN)
    [root] = api.ok("GET", "/api/ruleChains?pageSize=10&page=0")["data"]
    assert (root["name"], root["root"]) == ("RPC reply", True)
    assert [n["name"] for n in api.ok("GET", f"/api/ruleChain/{root['id']['id']}/metadata")["nodes"]] == [
        "switch", "formResponse", "rpcReply"]


def test_the_default_root_chain_cannot_be_deleted(api):
    status, error = api.call("DELETE", f"/api/ruleChain/{default_root_id(TENANT)}")
    assert (status, error["message"]) == (400, ROOT_DELETE_REFUSED)


def test_saving_the_default_root_chains_metadata_stores_it_as_the_tenants_root(api):
    root_id = str(default_root_id(TENANT))
    metadata = api.ok("GET", f"/api/ruleChain/{root_id}/metadata")
    kept_ids = [node["id"] for node in metadata["nodes"]]
    metadata["nodes"][3]["name"] = "Log RPC from Device (renamed)"
    saved = api.ok("POST", "/api/ruleChain/metadata", metadata)
    assert [node["id"] for node in saved["nodes"]] == kept_ids  # node ids survive the save
    assert saved["nodes"][3]["name"] == "Log RPC from Device (renamed)"
    stored = api.ok("GET", f"/api/ruleChain/{root_id}")
    assert stored["root"] is True and stored["createdTime"] == T0 * 1000 and stored["version"] >= 2
    assert api.ok("GET", "/api/ruleChains?pageSize=10&page=0")["totalElements"] == 1
    assert api.rules.changed == [TENANT]


# --- metadata -------------------------------------------------------------------------------------------------------

def test_saved_metadata_comes_back_with_node_ids_and_sets_the_first_node(api):
    created = api.chain()
    saved = api.ok("POST", "/api/ruleChain/metadata", metadata_of(
        created, [SWITCH_NODE, LOG_NODE], [{"fromIndex": 0, "toIndex": 1, "type": "Other"}]))
    assert saved["ruleChainId"] == created["id"] and saved["firstNodeIndex"] == 0
    assert [node["name"] for node in saved["nodes"]] == ["switch", "log"]
    assert all(node["id"]["entityType"] == "RULE_NODE" and node["ruleChainId"] == created["id"]
               for node in saved["nodes"])
    assert saved["connections"] == [{"fromIndex": 0, "toIndex": 1, "type": "Other"}]
    assert api.ok("GET", f"/api/ruleChain/{created['id']['id']}/metadata") == saved
    chain = api.ok("GET", f"/api/ruleChain/{created['id']['id']}")
    assert chain["firstRuleNodeId"] == saved["nodes"][0]["id"] and chain["version"] == 2


def test_resaving_metadata_keeps_the_ids_of_its_nodes_and_gives_new_nodes_new_ones(api):
    created = api.chain()
    first = api.ok("POST", "/api/ruleChain/metadata", metadata_of(created, [SWITCH_NODE], []))
    again = copy.deepcopy(first)
    again["nodes"].append(copy.deepcopy(LOG_NODE))
    again["nodes"][1]["id"] = {"entityType": "RULE_NODE", "id": str(uuid4())}  # an id not of this chain
    again["connections"] = [{"fromIndex": 0, "toIndex": 1, "type": "Other"}]
    second = api.ok("POST", "/api/ruleChain/metadata", again)
    assert second["nodes"][0]["id"] == first["nodes"][0]["id"]
    assert second["nodes"][1]["id"] != again["nodes"][1]["id"]


def test_invalid_metadata_is_refused_with_every_problem_listed_and_nothing_stored(api):
    created = api.chain()
    bad = metadata_of(created, [SWITCH_NODE, {"type": "com.example.NoSuchNode", "name": "mystery"},
                                {**LOG_NODE, "configuration": {"scriptLang": "JS", "jsScript": "return (;"}}],
                      [{"fromIndex": 0, "toIndex": 9, "type": "Other"}])
    status, error = api.call("POST", "/api/ruleChain/metadata", body=bad)
    assert status == 400, error
    assert (error["status"], error["errorCode"]) == (400, 31)
    problems = error["problems"]
    assert len(problems) >= 3, problems
    assert all(set(p) == {"index", "name", "message"} for p in problems)
    assert any(p["index"] == 1 and p["name"] == "mystery" for p in problems)
    assert any(p["index"] == 2 for p in problems)
    assert "9" in " ".join(p["message"] for p in problems)
    assert api.ok("GET", f"/api/ruleChain/{created['id']['id']}/metadata")["nodes"] == []
    assert api.rules.changed == []


def test_metadata_needs_a_chain_of_the_tenant(api):
    assert api.call("POST", "/api/ruleChain/metadata", body={"nodes": []})[0] == 400
    assert api.call("POST", "/api/ruleChain/metadata",
                    body={"ruleChainId": {"entityType": "RULE_CHAIN", "id": str(uuid4())}, "nodes": []})[0] == 404
    created = api.chain()
    assert api.call("POST", "/api/ruleChain/metadata", OTHER_ADMIN, metadata_of(created, [], []))[0] == 403


# --- import -----------------------------------------------------------------------------------------------------------

def test_an_export_file_is_imported_as_a_new_non_root_chain(api):
    imported = api.ok("POST", "/api/ruleChain/import", REPLY_CHAIN)
    assert (imported["name"], imported["root"], imported["type"]) == ("RPC reply", False, "CORE")
    assert imported["additionalInfo"] == {"description": "answers getResponse"}
    metadata = api.ok("GET", f"/api/ruleChain/{imported['id']['id']}/metadata")
    assert [n["name"] for n in metadata["nodes"]] == ["switch", "formResponse", "rpcReply"]
    assert imported["firstRuleNodeId"] == metadata["nodes"][0]["id"]
    assert api.rules.changed == []  # not a root chain: nothing runs differently


def test_an_invalid_export_file_is_refused_with_all_its_problems(api):
    bad = copy.deepcopy(REPLY_CHAIN)
    bad["ruleChain"]["name"] = ""
    bad["metadata"]["nodes"][1]["configuration"]["jsScript"] = "return {;"
    bad["metadata"]["connections"].append({"fromIndex": 7, "toIndex": 0, "type": "Success"})
    status, error = api.call("POST", "/api/ruleChain/import", body=bad)
    assert status == 400 and error["errorCode"] == 31
    assert len(error["problems"]) >= 3, error["problems"]
    assert api.ok("GET", "/api/ruleChains?pageSize=10&page=0")["totalElements"] == 1  # only the default root


# --- listing, root, delete --------------------------------------------------------------------------------------------

def test_chains_are_listed_after_the_default_root_one_page_at_a_time(api):
    for name in ("c1", "c2", "c3"):
        api.chain(name)
        api.clock.advance(1)
    pages = [api.ok("GET", f"/api/ruleChains?pageSize=2&page={page}") for page in (0, 1)]
    assert [[c["name"] for c in p["data"]] for p in pages] == [["Root Rule Chain", "c1"], ["c2", "c3"]]
    assert [(p["totalElements"], p["totalPages"], p["hasNext"]) for p in pages] == [(4, 2, True), (4, 2, False)]
    found = api.ok("GET", "/api/ruleChains?pageSize=10&page=0&textSearch=C2")
    assert [c["name"] for c in found["data"]] == ["c2"]
    by_name = api.ok("GET", "/api/ruleChains?pageSize=10&page=0&sortProperty=name&sortOrder=DESC")
    assert [c["name"] for c in by_name["data"]][1:] == ["c3", "c2", "c1"]
    assert api.ok("GET", "/api/ruleChains?pageSize=10&page=0", who=OTHER_ADMIN)["totalElements"] == 1
    assert api.call("GET", "/api/ruleChains?pageSize=0&page=0")[0] == 400
    assert api.call("GET", "/api/ruleChains?pageSize=10&page=0&sortProperty=nodes")[0] == 400


def test_setting_a_root_chain_replaces_the_default_and_moves_on(api):
    first, second = api.chain("first"), api.chain("second")
    rooted = api.ok("POST", f"/api/ruleChain/{first['id']['id']}/root")
    assert rooted["root"] is True and rooted["version"] == 2
    listed = api.ok("GET", "/api/ruleChains?pageSize=10&page=0")
    assert sorted((c["name"], c["root"]) for c in listed["data"]) == [("first", True), ("second", False)]
    assert api.call("GET", f"/api/ruleChain/{default_root_id(TENANT)}")[0] == 404
    api.ok("POST", f"/api/ruleChain/{second['id']['id']}/root")
    assert api.ok("GET", f"/api/ruleChain/{first['id']['id']}")["root"] is False
    assert api.rules.changed == [TENANT, TENANT]
    again = api.ok("POST", f"/api/ruleChain/{second['id']['id']}/root")  # already root: nothing changes
    assert again["root"] is True and api.rules.changed == [TENANT, TENANT]


def test_an_edge_chain_cannot_be_root(api):
    edge = api.ok("POST", "/api/ruleChain", {"name": "edge", "type": "EDGE"})
    assert api.call("POST", f"/api/ruleChain/{edge['id']['id']}/root")[0] == 400


def test_a_stored_root_chain_cannot_be_deleted_and_another_chain_can(api):
    root, other = api.chain("root"), api.chain("other")
    api.ok("POST", f"/api/ruleChain/{root['id']['id']}/root")
    status, error = api.call("DELETE", f"/api/ruleChain/{root['id']['id']}")
    assert (status, error["message"]) == (400, ROOT_DELETE_REFUSED)
    status, body = api.call("DELETE", f"/api/ruleChain/{other['id']['id']}")
    assert (status, body) == (200, b"")
    assert api.call("GET", f"/api/ruleChain/{other['id']['id']}")[0] == 404
    assert api.call("DELETE", f"/api/ruleChain/{other['id']['id']}")[0] == 404


def test_renaming_the_root_chain_tells_the_rule_service(api):
    root = api.chain("root")
    api.ok("POST", f"/api/ruleChain/{root['id']['id']}/root")
    current = api.ok("GET", f"/api/ruleChain/{root['id']['id']}")
    api.ok("POST", "/api/ruleChain", {**current, "name": "renamed"})
    assert api.rules.changed == [TENANT, TENANT]


def test_the_api_works_without_a_rule_service(api):
    bare = Api(rules=None)
    try:
        [root] = bare.ok("GET", "/api/ruleChains?pageSize=10&page=0")["data"]
        assert root["name"] == "Root Rule Chain"
        created = bare.chain()
        bare.ok("POST", f"/api/ruleChain/{created['id']['id']}/root")
    finally:
        bare.repository.stop()


# --- relations --------------------------------------------------------------------------------------------------------

def relation_body(from_id: UUID, to_id: UUID, relation_type: str = "Contains", from_type: str = "DEVICE",
                  to_type: str = "DEVICE", **extra: Any) -> dict[str, Any]:
    return {"from": {"entityType": from_type, "id": str(from_id)}, "to": {"entityType": to_type, "id": str(to_id)},
            "type": relation_type, **extra}


def test_a_relation_between_two_devices_is_saved_listed_and_deleted(api):
    a, b = api.device("a"), api.device("b")
    saved = api.ok("POST", "/api/relation", relation_body(a, b, additionalInfo={"note": 1}))
    assert saved == {**relation_body(a, b), "typeGroup": "COMMON", "additionalInfo": {"note": 1}}
    assert api.ok("GET", f"/api/relations?fromId={a}&fromType=DEVICE") == [saved]
    assert api.ok("GET", f"/api/relations?fromId={a}&fromType=DEVICE&relationType=Contains") == [saved]
    assert api.ok("GET", f"/api/relations?fromId={a}&fromType=DEVICE&relationType=Manages") == []
    assert api.ok("GET", f"/api/relations?toId={b}&toType=DEVICE") == [saved]
    assert api.ok("GET", f"/api/relation?fromId={a}&fromType=DEVICE&relationType=Contains&toId={b}&toType=DEVICE") \
        == saved
    path = f"/api/relation?fromId={a}&fromType=DEVICE&relationType=Contains&toId={b}&toType=DEVICE"
    assert api.call("DELETE", path) == (200, b"")
    assert api.call("DELETE", path)[0] == 404
    assert api.ok("GET", f"/api/relations?fromId={a}&fromType=DEVICE") == []


def test_a_relation_may_join_a_device_to_a_customer_the_tenant_and_a_rule_chain(api):
    device = api.device("d")
    results: list[Any] = []
    api.repository.create_customer(TENANT, "Acme").addCallback(results.append)
    customer = results[0]
    chain = api.chain()
    api.ok("POST", "/api/relation", relation_body(customer.id, device, from_type="CUSTOMER"))
    api.ok("POST", "/api/relation", relation_body(TENANT, device, "Manages", from_type="TENANT"))
    api.ok("POST", "/api/relation", relation_body(UUID(chain["id"]["id"]), device, "Uses", from_type="RULE_CHAIN",
                                                  typeGroup="RULE_CHAIN"))
    to_device = api.ok("GET", f"/api/relations?toId={device}&toType=DEVICE")
    assert sorted(r["type"] for r in to_device) == ["Contains", "Manages"]  # COMMON unless asked
    in_group = api.ok("GET", f"/api/relations?toId={device}&toType=DEVICE&relationTypeGroup=RULE_CHAIN")
    assert [r["type"] for r in in_group] == ["Uses"]


def test_relations_reach_only_the_tenants_own_entities(api):
    mine, theirs = api.device("mine"), api.device("theirs", tenant=OTHER_TENANT)
    assert api.call("POST", "/api/relation", body=relation_body(mine, theirs))[0] == 403
    assert api.call("POST", "/api/relation", body=relation_body(mine, uuid4()))[0] == 404
    assert api.call("POST", "/api/relation", body=relation_body(mine, uuid4(), to_type="ASSET"))[0] == 404
    assert api.call("POST", "/api/relation", body=relation_body(mine, OTHER_TENANT, from_type="DEVICE",
                                                                to_type="TENANT"))[0] == 403
    assert api.call("GET", f"/api/relations?fromId={theirs}&fromType=DEVICE")[0] == 403


def test_a_relation_needs_a_type_known_entity_types_and_a_valid_group(api):
    a, b = api.device("a"), api.device("b")
    status, error = api.call("POST", "/api/relation", body=relation_body(a, b, ""))
    assert (status, error["message"]) == (400, "Relation type should be specified!")
    assert api.call("POST", "/api/relation", body=relation_body(a, b, to_type="SPACESHIP"))[0] == 400
    assert api.call("POST", "/api/relation", body=relation_body(a, b, typeGroup="lower case"))[0] == 400
    assert api.call("POST", "/api/relation", body={"to": {"entityType": "DEVICE", "id": str(b)}})[0] == 400
    assert api.call("GET", "/api/relations")[0] == 400
    assert api.call("DELETE", f"/api/relation?fromId={a}&fromType=DEVICE&toId={b}&toType=DEVICE")[0] == 400


def test_only_tenant_admins_reach_relations(api):
    a, b = api.device("a"), api.device("b")
    for who in (CUSTOMER_USER, SYSADMIN):
        assert api.call("POST", "/api/relation", who, relation_body(a, b))[0] == 403
        assert api.call("GET", f"/api/relations?fromId={a}&fromType=DEVICE", who)[0] == 403


def test_all_relations_of_an_entity_are_deleted_at_once(api):
    a, b, c = api.device("a"), api.device("b"), api.device("c")
    api.ok("POST", "/api/relation", relation_body(a, b))
    api.ok("POST", "/api/relation", relation_body(c, a))
    assert api.call("DELETE", f"/api/relations?entityId={a}&entityType=DEVICE") == (200, b"")
    assert api.ok("GET", f"/api/relations?fromId={c}&fromType=DEVICE") == []
    assert api.ok("GET", f"/api/relations?toId={b}&toType=DEVICE") == []
