"""Starting a ReactorActor without Pykka's per-start log formatting: the same outcome as ``pykka.Actor.start``
(registered, ``on_start`` first, then the mail), and URNs that are unique version-4 UUID URNs."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from pykka import ActorRegistry

from nanoiot.actors.runtime import ReactorActor
from tests.fixtures.actors import actors_on_clock


class Recorder(ReactorActor):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def on_start(self) -> None:
        self.log.append("on_start")

    def on_receive(self, message: Any) -> Any:
        self.log.append(message)
        return message


def test_a_started_actor_is_registered_starts_before_its_mail_and_answers(monkeypatch: pytest.MonkeyPatch):
    with actors_on_clock(monkeypatch) as clock:
        log: list = []
        ref = Recorder.start(log)
        assert ref in ActorRegistry.get_all() and ref.is_alive()
        assert ActorRegistry.get_by_urn(ref.actor_urn) is ref
        ref.tell("first")
        answer = ref.ask("second", block=False)
        assert log == []  # nothing runs inline: the dispatcher's turn does
        clock.advance(0)
        assert log == ["on_start", "first", "second"]
        assert answer.get() == "second"


def test_actor_urns_are_distinct_version_4_uuid_urns(monkeypatch: pytest.MonkeyPatch):
    with actors_on_clock(monkeypatch):
        urns = [Recorder.start([]).actor_urn for _ in range(1000)]
        assert len(set(urns)) == 1000
        for urn in urns[:3] + urns[-3:]:
            assert urn.startswith("urn:uuid:") and UUID(urn[len("urn:uuid:"):]).version == 4
