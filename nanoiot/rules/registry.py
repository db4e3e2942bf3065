"""Which node ``type`` strings a chain may use, and how to build each.

Built in: ThingsBoard's FQCNs this server implements (``nanoiot.rules.nodes.BUILTIN_NODES``). Added: the entry
points of group ``nanoiot.rule_nodes`` (the ``type`` is the entry point's name; an entry point may also replace a
built-in FQCN), and anything ``register``-ed, which wins over both.

A factory is called with the node's :class:`~nanoiot.rules.nodes.base.NodeSpec` and returns an object with
``on_message(msg, ctx)`` (returning ``Deferred[list[(relation, msg)]]`` or the list itself). Optional attributes,
as :class:`~nanoiot.rules.nodes.base.BaseNode` has them: ``version`` and ``upgrade(from_version, config)``
(configuration upgrades), ``relations`` (fixed relations, for the chain's warnings), ``default_config``.
Entry points are loaded when a chain first uses their type.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

from nanoiot.rules.nodes import BUILTIN_NODES

__all__ = ["ENTRY_POINT_GROUP", "NodeFactory", "NodeRegistry", "NodeTypeError"]

ENTRY_POINT_GROUP = "nanoiot.rule_nodes"

NodeFactory = Callable[[Any], Any]


class NodeTypeError(LookupError):
    """A node type that is not known, or whose entry point failed to load."""


class NodeRegistry:
    def __init__(self, *, builtins: bool = True, entry_points: bool = True) -> None:
        self._factories: dict[str, NodeFactory] = {}
        self._pending: dict[str, importlib.metadata.EntryPoint] = {}
        if builtins:
            for node_class in BUILTIN_NODES:
                self._factories[node_class.type] = node_class
        if entry_points:
            # Looked up through the module at call time, so that tests can stand in a fake entry point.
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                self._pending[ep.name] = ep

    def register(self, type_name: str, factory: NodeFactory) -> None:
        """Use ``factory`` for ``type_name`` (over a built-in or an entry point of that name)."""
        self._pending.pop(type_name, None)
        self._factories[type_name] = factory

    def get(self, type_name: str) -> NodeFactory:
        """The factory of ``type_name``; raises NodeTypeError."""
        ep = self._pending.get(type_name)
        if ep is not None:
            try:
                factory = ep.load()
            except Exception as e:
                raise NodeTypeError(f"node type {type_name!r} (entry point {ep.value}) failed to load: "
                                    f"{type(e).__name__}: {e}") from e
            del self._pending[type_name]
            self._factories[type_name] = factory
            return factory
        factory = self._factories.get(type_name)
        if factory is None:
            raise NodeTypeError(f"unknown node type {type_name!r}")
        return factory

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._factories or type_name in self._pending

    def types(self) -> list[str]:
        return sorted({*self._factories, *self._pending})


def node_version(factory: NodeFactory) -> int | None:
    version = getattr(factory, "version", None)
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def node_relations(factory: NodeFactory) -> tuple[str, ...] | None:
    relations = getattr(factory, "relations", None)
    return tuple(relations) if isinstance(relations, (tuple, list)) else None


def node_default_config(factory: NodeFactory) -> dict[str, Any]:
    config = getattr(factory, "default_config", None)
    return dict(config) if isinstance(config, dict) else {}
