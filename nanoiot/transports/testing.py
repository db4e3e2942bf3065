"""Test doubles for the device port, shared by every transport's tests: a :class:`RecordingLink` that records what a
session reports, and a :class:`RecordingAttach` that hands one out per attached session. No actors, no reactor.

A report is recorded as a plain tuple, named after the :class:`~nanoiot.port.link.DeviceLink` method:
``("subscribed", one_shot)``, ``("unsubscribed",)``, ``("acked", request_id)``, ``("answered", request_id,
payload)``, ``("called", request_id, payload)``, ``("closed",)``.

A report's ``done`` (the actor has handled it) is called at once, unless the link was made with ``hold=True``: then
it waits in ``held`` until the test calls it, as a busy actor would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class RecordingLink:
    """A :class:`~nanoiot.port.link.DeviceLink` that records every report, in order, in ``calls``."""

    def __init__(self, session: Any = None, journal: list[tuple[int, tuple]] | None = None,
                 hold: bool = False) -> None:
        #: The session this link was attached for (None for a link made by hand).
        self.session = session
        self.calls: list[tuple] = []
        self.hold = hold
        #: The ``done`` of every report not handled yet (only with ``hold``), oldest first.
        self.held: list[Callable[[], None]] = []
        #: Shared with the other links of one :class:`RecordingAttach`: ``(session id, call)`` in report order.
        self._journal = journal

    def _record(self, call: tuple) -> None:
        self.calls.append(call)
        if self._journal is not None:
            self._journal.append((getattr(self.session, "session_id", None), call))

    def of(self, name: str) -> list[tuple]:
        """The calls of one kind: ``link.of("acked") == [("acked", 7)]``."""
        return [call for call in self.calls if call[0] == name]

    # --- DeviceLink -----------------------------------------------------------------------------------------------

    def subscribed(self, one_shot: bool = False) -> None:
        self._record(("subscribed", one_shot))

    def unsubscribed(self) -> None:
        self._record(("unsubscribed",))

    def acked(self, request_id: int) -> None:
        self._record(("acked", request_id))

    def _handled(self, done: Callable[[], None] | None) -> None:
        if done is None:
            return
        if self.hold:
            self.held.append(done)
        else:
            done()

    def handle(self, count: int | None = None) -> int:
        """Call the ``done`` of the oldest ``count`` held reports (all by default), as the actor would; how many."""
        taken = self.held if count is None else self.held[:count]
        self.held = self.held[len(taken):]
        for done in taken:
            done()
        return len(taken)

    def answered(self, request_id: int, payload: bytes, done: Callable[[], None] | None = None) -> None:
        self._record(("answered", request_id, payload))
        self._handled(done)

    def called(self, request_id: int, payload: bytes, done: Callable[[], None] | None = None) -> None:
        self._record(("called", request_id, payload))
        self._handled(done)

    def closed(self) -> None:
        self._record(("closed",))

    def __repr__(self) -> str:
        return f"RecordingLink(session_id={getattr(self.session, 'session_id', None)}, calls={self.calls!r})"


@dataclass(frozen=True)
class Attached:
    """One ``attach(device, session, exclusive)`` call, and the link it returned."""

    device: Any
    session: Any
    exclusive: bool
    link: RecordingLink


class RecordingAttach:
    """An :data:`~nanoiot.port.link.Attach` double: every call attaches a fresh :class:`RecordingLink`.

    ``attached`` lists the calls in order; ``reports`` is every link's calls interleaved in the order they were made,
    as ``(session id, call)`` pairs (``reports == []``: nothing was reported on any session)."""

    def __init__(self, hold: bool = False) -> None:
        self.attached: list[Attached] = []
        self.reports: list[tuple[int, tuple]] = []
        #: Links hold their reports' ``done`` until the test handles them (see :class:`RecordingLink`).
        self.hold = hold

    def __call__(self, device: Any, session: Any, exclusive: bool) -> RecordingLink:
        link = RecordingLink(session, self.reports, self.hold)
        self.attached.append(Attached(device, session, exclusive, link))
        return link

    @property
    def sessions(self) -> list[Any]:
        return [a.session for a in self.attached]

    def link(self, session: Any) -> RecordingLink:
        """The link ``session`` was attached with (the latest, were it attached twice)."""
        for attached in reversed(self.attached):
            if attached.session is session:
                return attached.link
        raise LookupError(f"session {getattr(session, 'session_id', session)!r} was never attached")

    def calls(self, session: Any) -> list[tuple]:
        """What ``session`` reported through its link."""
        return self.link(session).calls
