"""Rule chains as ThingsBoard exports them, loaded, checked and normalised.

The file is ThingsBoard's own export (``{"ruleChain": ..., "metadata": {"firstNodeIndex", "nodes", "connections"}}``)
so that a chain exported from ThingsBoard runs here unchanged. Loading does what ThingsBoard's import does:
- legacy ``debugMode`` becomes ``debugSettings``; legacy ``metadata.ruleChainConnections`` become Rule Chain input
  nodes with connections (named "Rule Chain Input": the target chain's name is not known here);
- configuration upgrades by ``configurationVersion`` (e.g. check relation's direction flip, REST API call's
  ``trimDoubleQuotes``); an upgrade that fails keeps the configuration as exported (ThingsBoard does the same);
- refusals: no name, an unknown node type, a configuration a node cannot work with (TBEL that is not JavaScript
  among them), connection indexes out of range, a connection of a node to itself, circular connections,
  ``firstNodeIndex`` out of range. Every problem is listed at once (:class:`ChainProblems`).

ThingsBoard does not check connection labels against a node's relations, so neither do we: an unknown label on a
node with fixed relations is only a warning (``RuleChain.warnings``), as are nodes that do nothing here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from uuid import UUID, uuid5

from nanoiot.ids import uuid4
from nanoiot.rules.nodes.base import InvalidConfig, NodeSpec
from nanoiot.rules.registry import NodeRegistry, NodeTypeError, node_default_config, node_relations, node_version

__all__ = [
    "ChainProblems",
    "NodeSpec",
    "Problem",
    "RuleChain",
    "default_root_chain",
    "load_chain",
    "load_chain_file",
]

INPUT_NODE = "org.thingsboard.rule.engine.flow.TbRuleChainInputNode"
LEGACY_INPUT_NAME = "Rule Chain Input"
_NODE_NAMESPACE = UUID("6f1d3c8e-2b7a-4f0e-9a51-7c1b2d9e4a10")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a chain: which node (index and name, when it is about a node) and what."""

    index: int | None
    name: str | None
    message: str

    def __str__(self) -> str:
        if self.index is None:
            return self.message
        if self.name:
            return f"node {self.index} ({self.name!r}): {self.message}"
        return f"node {self.index}: {self.message}"


class ChainProblems(ValueError):
    """A chain that cannot be loaded; ``problems`` lists every reason, ``str()`` one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass
class RuleChain:
    id: UUID
    name: str
    root: bool
    #: The index of the node messages enter by; None: they end at once.
    first: int | None
    nodes: list[NodeSpec]
    #: fromIndex -> [(relation label lower-cased, toIndex)], in the export's order.
    connections: dict[int, list[tuple[str, int]]]
    #: The normalised export (legacy fields converted, configurations upgraded): what to store and serve.
    export: dict[str, Any]
    type: str = "CORE"
    #: Things accepted but worth knowing (unknown relation labels, nodes that do nothing here).
    warnings: list[Problem] = field(default_factory=list)
    _routes: dict[int, dict[str, list[int]]] = field(init=False, repr=False, compare=False)
    _by_index: dict[int, NodeSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_index = {spec.index: spec for spec in self.nodes}
        routes: dict[int, dict[str, list[int]]] = {}
        for from_index, outs in self.connections.items():
            by_label = routes.setdefault(from_index, {})
            for label, to_index in outs:
                by_label.setdefault(label, []).append(to_index)
        self._routes = routes

    def node(self, index: int) -> NodeSpec:
        """The node at ``index`` of the export's node list."""
        return self._by_index[index]

    def targets(self, index: int, relation: str) -> list[int]:
        """The nodes a message emitted by node ``index`` on ``relation`` goes to (labels match ignoring case; one
        entry per connection, so two connections with one label copy the message twice)."""
        by_label = self._routes.get(index)
        if not by_label:
            return []
        return by_label.get(relation.lower(), [])


def default_root_chain() -> dict[str, Any]:
    """ThingsBoard's default root rule chain (TB 4.x), parsed: the chain that runs when none is loaded."""
    text = resources.files("nanoiot.rules").joinpath("default_root_chain.json").read_text("utf-8")
    return json.loads(text)


def load_chain_file(path: str, registry: NodeRegistry | None = None, chain_id: UUID | None = None) -> RuleChain:
    """:func:`load_chain` of a file; a file that is not JSON is a problem like any other."""
    try:
        with open(path, encoding="utf-8") as f:
            export = json.load(f)
    except (OSError, ValueError) as e:
        raise ChainProblems([Problem(None, None, f"{path}: cannot be read as JSON: {e}")]) from None
    return load_chain(export, registry, chain_id)


def _uuid_of(raw: Any) -> UUID | None:
    """The UUID of an ``{"entityType", "id"}`` id, if it is one."""
    if isinstance(raw, dict):
        raw = raw.get("id")
    if raw is None:
        return None
    try:
        return UUID(str(raw))
    except ValueError:
        return None


def _is_index(value: Any, count: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


class _Loader:
    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def problem(self, index: int | None, name: str | None, message: str) -> None:
        self.problems.append(Problem(index, name, message))

    def warn(self, index: int | None, name: str | None, message: str) -> None:
        self.warnings.append(Problem(index, name, message))

    # --- the whole chain ------------------------------------------------------------------------------------------

    def load(self, export: Any, chain_id: UUID | None) -> RuleChain:
        if not isinstance(export, dict):
            raise ChainProblems([Problem(None, None, "a rule chain export must be a JSON object with 'ruleChain' "
                                                     "and 'metadata'")])
        export = copy.deepcopy(export)
        chain = export.get("ruleChain")
        metadata = export.get("metadata")
        if not isinstance(chain, dict):
            self.problem(None, None, "'ruleChain' is missing")
            chain = export["ruleChain"] = {}
        if not isinstance(metadata, dict):
            self.problem(None, None, "'metadata' is missing")
            metadata = export["metadata"] = {}
        name = chain.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problem(None, None, "the rule chain's name is missing")
            name = ""
        if not chain.get("type"):
            chain["type"] = "CORE"
        if chain["type"] != "CORE":
            self.problem(None, None, f"rule chain type {chain['type']!r} is not supported: only CORE chains run here")
        chain_id = chain_id or _uuid_of(chain.get("id")) or uuid4()

        nodes = metadata.get("nodes")
        if nodes is None:
            nodes = metadata["nodes"] = []
        if not isinstance(nodes, list):
            self.problem(None, None, "'metadata.nodes' must be a list")
            nodes = metadata["nodes"] = []
        connections = metadata.get("connections")
        if connections is None:
            connections = metadata["connections"] = []
        if not isinstance(connections, list):
            self.problem(None, None, "'metadata.connections' must be a list")
            connections = metadata["connections"] = []
        self.convert_chain_connections(metadata, nodes, connections)

        specs = [self.load_node(i, raw, chain_id) for i, raw in enumerate(nodes)]
        routes = self.load_connections(connections, specs)
        self.check_cycles(routes, specs)
        first = self.first_index(metadata.get("firstNodeIndex"), len(nodes))
        if self.problems:
            raise ChainProblems(self.problems)
        return RuleChain(
            id=chain_id,
            name=name,
            root=bool(chain.get("root")),
            first=first,
            nodes=[spec for spec in specs if spec is not None],
            connections=routes,
            export=export,
            type=chain["type"],
            warnings=self.warnings,
        )

    def convert_chain_connections(self, metadata: dict[str, Any], nodes: list[Any],
                                  connections: list[Any]) -> None:
        """Legacy ``ruleChainConnections`` as Rule Chain input nodes (the UI's processOldRuleChainConnections)."""
        legacy = metadata.get("ruleChainConnections")
        if not legacy:
            metadata["ruleChainConnections"] = None
            return
        if not isinstance(legacy, list):
            self.problem(None, None, "'metadata.ruleChainConnections' must be a list")
            return
        for k, link in enumerate(legacy):
            target = _uuid_of(link.get("targetRuleChainId")) if isinstance(link, dict) else None
            if target is None:
                self.problem(None, None, f"ruleChainConnections[{k}]: targetRuleChainId is missing")
                continue
            info = link.get("additionalInfo")
            name = (info or {}).get("ruleChainName") if isinstance(info, dict) else None
            connections.append({"fromIndex": link.get("fromIndex"), "toIndex": len(nodes), "type": link.get("type")})
            nodes.append({"type": INPUT_NODE, "name": name or LEGACY_INPUT_NAME, "singletonMode": False,
                          "configuration": {"ruleChainId": str(target)}, "additionalInfo": info})
        metadata["ruleChainConnections"] = None

    # --- one node -------------------------------------------------------------------------------------------------

    def load_node(self, index: int, raw: Any, chain_id: UUID) -> NodeSpec | None:
        if not isinstance(raw, dict):
            self.problem(index, None, "a node must be a JSON object")
            return None
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problem(index, None, "the node's name is missing")
            name = ""
        # The UI's import: debugMode true becomes debugSettings, and the key goes either way.
        if "debugMode" in raw and raw.pop("debugMode") is True and not raw.get("debugSettings"):
            raw["debugSettings"] = {"failuresEnabled": True, "allEnabled": True}
        type_name = raw.get("type")
        if not isinstance(type_name, str) or not type_name:
            self.problem(index, name, "the node's type is missing")
            return None
        try:
            factory = self.registry.get(type_name)
        except NodeTypeError as e:
            self.problem(index, name, str(e))
            return None

        version_in = raw.get("configurationVersion") or 0
        if not isinstance(version_in, int) or isinstance(version_in, bool) or version_in < 0:
            self.problem(index, name, f"configurationVersion must be a whole number, not {version_in!r}")
            version_in = 0
        config = self.upgraded_config(index, name, factory, raw.get("configuration"), version_in)
        version = node_version(factory)
        if version is not None and version_in < version:
            raw["configurationVersion"] = version_in = version
        raw["configuration"] = config

        node_id = _uuid_of(raw.get("id")) or uuid5(_NODE_NAMESPACE, f"{chain_id}/{index}")
        spec = NodeSpec(
            index=index,
            id=node_id,
            type=type_name,
            name=name,
            configuration=copy.deepcopy(config),
            configuration_version=version_in,
            chain_id=chain_id,
            debug_settings=raw.get("debugSettings"),
            singleton_mode=bool(raw.get("singletonMode")),
            queue_name=raw.get("queueName"),
            additional_info=raw.get("additionalInfo"),
        )
        try:
            node = factory(spec)
        except InvalidConfig as e:
            for message in e.messages:
                self.problem(index, name, f"configuration is invalid: {message}")
            return spec
        except Exception as e:  # a plugin's own error: the chain is refused, naming the node
            self.problem(index, name, f"cannot be built: {type(e).__name__}: {e}")
            return spec
        if not callable(getattr(node, "on_message", None)):
            self.problem(index, name, f"node type {type_name!r} built an object without on_message")
            return spec
        spec.node = node
        for warning in getattr(node, "warnings", None) or []:
            self.warn(index, name, warning)
        return spec

    def upgraded_config(self, index: int, name: str, factory: Any, config: Any, version_in: int) -> dict[str, Any]:
        """ThingsBoard's TbNodeUpgradeUtils: a missing configuration becomes the default one; an older one is
        upgraded; a failed upgrade keeps it as it was."""
        if not isinstance(config, dict):
            self.warn(index, name, "configuration is missing: the node's default configuration is used")
            return node_default_config(factory)
        version = node_version(factory)
        upgrade = getattr(factory, "upgrade", None)
        if version is None or version_in >= version or not callable(upgrade):
            return config
        try:
            upgraded = upgrade(version_in, copy.deepcopy(config))
        except Exception as e:
            self.warn(index, name, f"configuration upgrade from version {version_in} failed ({e}): kept as exported")
            return config
        return upgraded if isinstance(upgraded, dict) else config

    # --- connections ----------------------------------------------------------------------------------------------

    def load_connections(self, connections: list[Any],
                         specs: list[NodeSpec | None]) -> dict[int, list[tuple[str, int]]]:
        count = len(specs)
        routes: dict[int, list[tuple[str, int]]] = {}

        def name_of(i: Any) -> str | None:
            spec = specs[i] if _is_index(i, count) else None
            return spec.name if spec is not None else None

        for k, c in enumerate(connections):
            if not isinstance(c, dict):
                self.problem(None, None, f"connection {k}: must be an object with fromIndex, toIndex and type")
                continue
            from_index, to_index, label = c.get("fromIndex"), c.get("toIndex"), c.get("type")
            where = f"connection {k} ({from_index!r} -> {to_index!r}, {label!r})"
            ok = True
            if not _is_index(from_index, count):
                self.problem(None, None, f"{where}: fromIndex is out of range (the chain has {count} nodes)")
                ok = False
            if not _is_index(to_index, count):
                owner = from_index if _is_index(from_index, count) else None
                self.problem(owner, name_of(owner), f"{where}: toIndex is out of range (the chain has {count} nodes)")
                ok = False
            if not isinstance(label, str) or not label:
                self.problem(from_index if ok else None, name_of(from_index), f"{where}: the relation type is missing")
                ok = False
            if ok and from_index == to_index:
                self.problem(from_index, name_of(from_index), f"{where}: Can't create the relation to yourself.")
                ok = False
            if not ok:
                continue
            routes.setdefault(from_index, []).append((label.lower(), to_index))
            self.check_label(from_index, label, specs[from_index])
        return routes

    def check_label(self, index: int, label: str, spec: NodeSpec | None) -> None:
        if spec is None or spec.node is None:
            return
        if getattr(spec.node, "output", False):
            self.warn(index, spec.name, f"an Output node's connections are never followed (relation {label!r})")
            return
        relations = node_relations(spec.node)
        if relations is not None and label.lower() not in {r.lower() for r in relations}:
            self.warn(index, spec.name, f"relation {label!r} is never emitted by this node type "
                                        f"(it emits {', '.join(relations)})")

    def check_cycles(self, routes: dict[int, list[tuple[str, int]]], specs: list[NodeSpec | None]) -> None:
        """ThingsBoard refuses circular connections: one problem per cycle found."""
        white, grey, black = 0, 1, 2
        colour = dict.fromkeys(range(len(specs)), white)
        seen: set[frozenset[int]] = set()
        for start in range(len(specs)):
            if colour[start] != white:
                continue
            path: list[int] = [start]
            stack = [iter([to for _, to in routes.get(start, [])])]
            colour[start] = grey
            while stack:
                node = next(stack[-1], None)
                if node is None:
                    stack.pop()
                    colour[path.pop()] = black
                    continue
                if colour[node] == grey:
                    cycle = path[path.index(node):] + [node]
                    key = frozenset(cycle)
                    if key not in seen:
                        seen.add(key)
                        spec = specs[node]
                        self.problem(node, spec.name if spec else None, "Can't create circling relations in rule "
                                     f"chain: {' -> '.join(str(i) for i in cycle)}")
                elif colour[node] == white:
                    colour[node] = grey
                    path.append(node)
                    stack.append(iter([to for _, to in routes.get(node, [])]))

    def first_index(self, first: Any, count: int) -> int | None:
        if first is None:
            if count:
                self.warn(None, None, "firstNodeIndex is not set: messages end at once")
            return None
        if not _is_index(first, count):
            self.problem(None, None, f"firstNodeIndex {first!r} is out of range (the chain has {count} nodes)")
            return None
        return first


def load_chain(export: dict[str, Any], registry: NodeRegistry | None = None,
               chain_id: UUID | None = None) -> RuleChain:
    """A chain from ThingsBoard's export format, normalised and with its nodes built; raises ChainProblems listing
    every problem. ``chain_id``: the id to run it under (else the export's own, else a new one)."""
    return _Loader(registry or NodeRegistry()).load(export, chain_id)
