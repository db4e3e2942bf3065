"""The catalog's token lookups during a connect storm: batched per reactor turn, one query at a time, the tokens
asked for meanwhile sent together once it ends (task.Clock; the repository's answers are fired by the test)."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet import task
from twisted.internet.defer import Deferred

from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.errors import DatabaseUnavailable
from nanoiot.persistence.records import NULL_UUID, Device


def device(name: str) -> Device:
    return Device(uuid4(), 0, uuid4(), NULL_UUID, name, "default", None, None)


class HeldLookups:
    """The repository's token query, answered when the test says: records each batch it was asked."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.pending: list[Deferred] = []

    def get_devices_by_tokens(self, tokens: list[str]) -> Deferred:
        self.batches.append(list(tokens))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


def answers(ds: list[Deferred]) -> list:
    """What each Deferred fired with, in the order of ``ds`` (None until it fires)."""
    out: list = [None] * len(ds)
    for index, d in enumerate(ds):
        d.addBoth(lambda result, index=index: out.__setitem__(index, result))
    return out


def test_tokens_asked_for_while_a_query_runs_go_together_once_it_ends():
    clock, repository = task.Clock(), HeldLookups()
    catalog = DeviceCatalog(repository, clock=clock, lookup_gather=0)  # type: ignore[arg-type]
    known = {f"t{i}": device(f"d{i}") for i in range(6)}
    first = answers([catalog.device_for_token("t0"), catalog.device_for_token("t1")])
    clock.advance(0)
    assert repository.batches == [["t0", "t1"]]
    later = answers([catalog.device_for_token(t) for t in ("t2", "t3", "t4", "t2", "nobody")])
    clock.advance(0)
    clock.advance(0)
    assert len(repository.batches) == 1  # they wait for the query under way
    repository.pending[0].callback({t: known[t] for t in ("t0", "t1")})
    assert first == [known["t0"], known["t1"]]
    assert repository.batches[1] == ["t2", "t3", "t4", "nobody"]  # sent at once, each token once
    repository.pending[1].callback({t: known[t] for t in ("t2", "t3", "t4")})
    assert later == [known["t2"], known["t3"], known["t4"], known["t2"], None]
    # Found devices are remembered: asked again, no query.
    again = answers([catalog.device_for_token("t3")])
    clock.advance(0)
    assert again == [known["t3"]] and len(repository.batches) == 2


def test_an_idle_catalog_asks_on_the_next_turn_and_a_full_batch_does_not_wait():
    clock, repository = task.Clock(), HeldLookups()
    catalog = DeviceCatalog(repository, clock=clock, lookup_batch=3)  # type: ignore[arg-type]
    catalog.device_for_token("a")
    clock.advance(0)
    assert repository.batches == [["a"]]
    for token in ("b", "c", "d", "e"):
        catalog.device_for_token(token)
    clock.advance(0)
    assert repository.batches == [["a"], ["b", "c", "d", "e"][:3], ["e"]]  # a full batch goes regardless


def test_a_failed_query_fails_its_callers_and_the_next_tokens_are_still_looked_up():
    clock, repository = task.Clock(), HeldLookups()
    catalog = DeviceCatalog(repository, clock=clock, lookup_gather=0)  # type: ignore[arg-type]
    failed = answers([catalog.device_for_token("a")])
    clock.advance(0)
    waiting = answers([catalog.device_for_token("b")])
    repository.pending[0].errback(DatabaseUnavailable(retry_after=3))
    assert failed[0].check(DatabaseUnavailable)
    assert repository.batches == [["a"], ["b"]]
    found = device("b")
    repository.pending[1].callback({"b": found})
    assert waiting == [found]


def test_after_a_query_a_few_waiting_tokens_wait_a_little_for_others_and_many_go_at_once():
    clock, repository = task.Clock(), HeldLookups()
    catalog = DeviceCatalog(repository, clock=clock, lookup_gather=0.002, lookup_gather_below=4)  # type: ignore[arg-type]
    catalog.device_for_token("a")
    clock.advance(0)  # idle: no waiting
    assert repository.batches == [["a"]]
    for token in ("b", "c"):
        catalog.device_for_token(token)
    repository.pending[0].callback({})
    assert len(repository.batches) == 1  # two waiting: they gather
    catalog.device_for_token("d")
    clock.advance(0.001)
    assert len(repository.batches) == 1
    clock.advance(0.001)
    assert repository.batches[1] == ["b", "c", "d"]
    for token in ("e", "f", "g", "h"):
        catalog.device_for_token(token)
    repository.pending[1].callback({})
    assert repository.batches[2] == ["e", "f", "g", "h"]  # enough of them: at once
