"""The rule engine: ThingsBoard's rule chains (its own export files), run on messages shaped like its TbMsg.

- :mod:`~nanoiot.rules.message`: the message (``RuleMessage``, ``EntityId``, ``MSG_TYPES``);
- :mod:`~nanoiot.rules.chain`: loading, checking and normalising a chain export (``load_chain``);
- :mod:`~nanoiot.rules.engine`: running a message through a chain (``RuleEngine.process``);
- :mod:`~nanoiot.rules.context`: what the server provides to nodes (``RuleContext``);
- :mod:`~nanoiot.rules.scripts`: JavaScript in embedded V8, off the reactor thread (``ScriptRunner``);
- :mod:`~nanoiot.rules.registry`: node types, built in and from entry points (``NodeRegistry``);
- :mod:`~nanoiot.rules.nodes`: the built-in nodes, one module per family.

Everything here is pure or Deferred-based and does no I/O of its own: the server implements the context.
"""

from __future__ import annotations

from nanoiot.rules.chain import ChainProblems, Problem, RuleChain, default_root_chain, load_chain, load_chain_file
from nanoiot.rules.context import NodeContext, RuleContext
from nanoiot.rules.engine import EngineStats, RuleEngine
from nanoiot.rules.message import MSG_TYPES, EntityId, RuleMessage
from nanoiot.rules.registry import NodeRegistry
from nanoiot.rules.scripts import Script, ScriptError, ScriptRunner, ScriptTimeout

__all__ = [
    "MSG_TYPES",
    "ChainProblems",
    "EngineStats",
    "EntityId",
    "NodeContext",
    "NodeRegistry",
    "Problem",
    "RuleChain",
    "RuleContext",
    "RuleEngine",
    "RuleMessage",
    "Script",
    "ScriptError",
    "ScriptRunner",
    "ScriptTimeout",
    "default_root_chain",
    "load_chain",
    "load_chain_file",
]
