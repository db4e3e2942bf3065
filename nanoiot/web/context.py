"""What the REST handlers share: the repository, the device cache, the actors, the token issuer, the settings."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from nanoiot.actors.directory import DeviceDirectory
from nanoiot.config import Config
from nanoiot.events import EventBus
from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.repository import Repository
from nanoiot.web.tokens import TokenIssuer


@dataclass
class WebContext:
    config: Config
    clock: IReactorTime
    repository: Repository
    catalog: DeviceCatalog
    directory: DeviceDirectory
    tokens: TokenIssuer
    journal: RpcJournal
    events: EventBus

    def publish(self, event: object) -> None:
        self.events.publish(event)

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)
