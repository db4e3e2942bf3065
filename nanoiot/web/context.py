"""What the REST handlers share: the repository, the device cache, the command service, the device port, the token
issuer, the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from nanoiot.commands.service import CommandService
from nanoiot.config import Config
from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.repository import Repository
from nanoiot.web.tokens import TokenIssuer


@dataclass
class WebContext:
    config: Config
    clock: IReactorTime
    repository: Repository
    catalog: DeviceCatalog
    #: The device port: ``attach`` for the HTTP device API, ``tell`` to reach a device's actor.
    directory: Any
    tokens: TokenIssuer
    commands: CommandService
    #: Where cluster nodes are listed (``GET /api/cluster/nodes``); None on a single node.
    cluster: Any = None
    #: Bulk RPC (``/api/rpc/bulk``): a :class:`nanoiot.commands.bulk.BulkRpc`; None where it is not wired.
    bulk: Any = None
    #: Rule chains (``/api/ruleChain...``): a :class:`nanoiot.rules.server.RuleService`; None with --rules-bypass.
    rules: Any = None
    #: Which devices have a session on this node (``active`` in device infos): a
    #: :class:`nanoiot.commands.presence.PresenceBook`; None where it is not wired (then never active).
    presence: Any = None

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)
