"""What every rule node is: built once from its spec when a chain loads, then handed messages.

A node's decision logic is a pure function of its configuration and the message (tested without a reactor); the
node's ``on_message`` only adds I/O through the context and returns ``Deferred[list[(relation, message)]]``.
Configuration errors are found when the chain loads (the constructor raises :class:`InvalidConfig`), not when the
first message arrives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from uuid import UUID

from twisted.internet.defer import Deferred, succeed

from nanoiot.rules.message import FAILURE, SUCCESS, RuleMessage

__all__ = [
    "BaseNode",
    "InvalidConfig",
    "NodeSpec",
    "Outputs",
    "RuleNode",
    "failure",
    "now_ms",
]

#: What a node emits: (relation, message) pairs, each routed to every connection with that label.
Outputs = list[tuple[str, RuleMessage]]


class InvalidConfig(ValueError):
    """A node configuration that cannot work; ``messages`` lists each thing wrong with it."""

    def __init__(self, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.messages = list(messages)


@dataclass
class NodeSpec:
    """One node of a loaded chain: its export entry, normalised, and the node built from it."""

    index: int
    id: UUID
    type: str
    name: str
    #: After legacy conversion and configuration upgrades.
    configuration: dict[str, Any]
    configuration_version: int = 0
    chain_id: UUID = field(default_factory=lambda: UUID(int=0))
    debug_settings: Mapping[str, Any] | None = None
    singleton_mode: bool = False
    queue_name: str | None = None
    additional_info: Any = None
    #: The node instance (None until the chain is built).
    node: Any = field(default=None, compare=False, repr=False)


class RuleNode(Protocol):
    """A node, as the engine calls it. Plugins (entry points) implement this; :class:`BaseNode` helps."""

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs] | Outputs: ...


def failure(msg: RuleMessage, error: str) -> tuple[str, RuleMessage]:
    """``msg`` down "Failure", carrying why (ThingsBoard's failureMessage); data and metadata unchanged."""
    return FAILURE, msg.with_(error=error)


def now_ms(ctx: Any) -> int:
    return int(ctx.clock.seconds() * 1000)


class BaseNode:
    """A built-in node: class attributes describe the ThingsBoard node class it stands for.

    - ``type``: ThingsBoard's FQCN.
    - ``version``: ThingsBoard's ``@RuleNode(version=N)``; ``upgrade`` brings an older configuration up to it.
      None: a pass-through whose configuration is kept exactly as exported (its upgrades are not ours to apply).
    - ``relations``: the fixed relations it emits, or None when they come from its configuration or a script.
    - ``default_config``: ThingsBoard's ``defaultConfiguration()``; missing keys are taken from it.
    """

    type: ClassVar[str] = ""
    version: ClassVar[int | None] = 0
    relations: ClassVar[tuple[str, ...] | None] = (SUCCESS, FAILURE)
    default_config: ClassVar[dict[str, Any]] = {}
    #: An Output node: what it emits goes back to the chain that called this one.
    output: ClassVar[bool] = False

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.config: dict[str, Any] = {**self.default_config, **spec.configuration}
        #: Things the node accepts but does not do here (reported with the chain's warnings).
        self.warnings: list[str] = []

    @classmethod
    def upgrade(cls, from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        """The configuration of ``version`` from one of ``from_version`` (which may be changed in place)."""
        return config

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        return succeed(self.decide(msg))

    def decide(self, msg: RuleMessage) -> Outputs:
        """The pure part of a node that needs no I/O."""
        raise NotImplementedError

    def deadline(self, msg: RuleMessage, now: int, default: float) -> float | None:
        """Seconds the engine gives this node for one message before sending it down Failure (None: no limit,
        the node ends by itself)."""
        return default

    # --- configuration helpers -----------------------------------------------------------------------------------

    def text(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = self.config.get(key, default)
        if value is None or value == "":
            if required:
                raise InvalidConfig(f"'{key}' must be set")
            return default
        if not isinstance(value, str):
            raise InvalidConfig(f"'{key}' must be a string, not {type(value).__name__}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false"):  # 3.x exports wrote some as strings
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise InvalidConfig(f"'{key}' must be true or false")
        return value

    def number(self, key: str, default: int = 0) -> int:
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise InvalidConfig(f"'{key}' must be a whole number")
        return int(value)
