"""The device port of a cluster node: which node's actor a message is for, and how it gets there.

Rules (docs/architecture.md, "The cluster", has the drawing):

- A device's actor lives on the node that *holds* the device: the node where its session attached, or, for a device
  with no session anywhere, the node that first had a command for it. ``device_owner`` says which node, with an
  epoch that grows with every claim; a claim made while another live node holds the device first asks that node to
  let go (it closes its sessions there, hands on lightweight commands still waiting, forgets persistent ones and
  answers once its journal is durable), then loads the device's active persistent commands from the database. So
  two nodes never deliver from one device's queue at the same time, and the new one resumes them in order, with the
  retries they have spent.
- A command for a device held elsewhere travels to that node (``tell``); its answer comes back to the caller's
  reply address directly. A node that gets a command for a device it no longer holds looks the owner up again.
- A lightweight command for a device whose node has died fails at once (DEVICE_OFFLINE), and so does every routed
  call still waiting on that node when it is declared dead; every routed call also has its own deadline.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nanoiot.actors import messages as m
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.actors.link import ActorLink
from nanoiot.actors.replies import Replies, ReplyTo
from nanoiot.cluster import codec
from nanoiot.cluster.router import Router
from nanoiot.errors import NotFound, RouteLost, ServiceUnavailable
from nanoiot.persistence.errors import DatabaseUnavailable
from nanoiot.persistence.records import Device
from nanoiot.port.link import DeviceLink
from nanoiot.port.session import DeviceSession
from nanoiot.rpc.model import RpcFailure, RpcResult, record_command
from nanoiot.timer_wheel import TimerWheel

log = Logger(namespace="nanoiot.cluster")

#: A message passed on this often without finding the device's node is served here (stale caches must not loop).
MAX_HOPS = 3
#: A routed lightweight command waits this long past its expiry for the other node's answer.
EXPIRY_GRACE_MS = 2000
#: The messages that follow a device to whichever node holds it (a session's messages stay where the session is).
_ROUTABLE = (m.SubmitRpc, m.DeleteRpc, m.Inspect, m.DeviceRemoved)
#: Routed calls' deadlines are kept in slots of this many seconds (a deadline may pass up to one slot late).
DEADLINE_RESOLUTION = 0.01


@dataclass(slots=True)
class _Routed:
    """A call of a local caller that went to another node, until its answer comes back."""

    node: str
    lightweight: bool
    #: Its deadline's slot in the port's :class:`_Deadlines`.
    slot: int


class _Deadlines(TimerWheel[ReplyTo]):
    """The routed calls' deadlines on one reactor call (a ``callLater`` made and cancelled per routed call was a
    DelayedCall on Twisted's heap for every call)."""

    def __init__(self, clock: IReactorTime, expired: Any) -> None:
        super().__init__(clock, resolution=DEADLINE_RESOLUTION)
        self.expired = expired

    def _due(self, owners: dict[ReplyTo, None]) -> None:
        for reply_to in owners:
            self.expired(reply_to)


class ClusterPort:
    #: Devices may be held by other nodes: commands go one by one through the actors that hold them.
    holds_every_device = False
    def __init__(self, node: str, local: DeviceDirectory, store: Any, router: Router, devices: Any,
                 repository: Any, journal: Any, clock: IReactorTime, dead_after_ms: int, route_timeout_ms: int,
                 owner_cache_size: int = 200_000) -> None:
        self.node = node
        self.local = local
        self.store = store
        self.router = router
        self.devices = devices
        self.repository = repository
        self.journal = journal
        self.clock = clock
        self.dead_after_ms = dead_after_ms
        self.route_timeout_ms = route_timeout_ms
        self.owner_cache_size = owner_cache_size
        self.replies: Replies = local.replies
        #: Devices this node holds, with the epoch of its claim.
        self.owned: dict[UUID, int] = {}
        #: Devices being claimed -> the messages for their actor, delivered once the claim is done.
        self._claiming: dict[UUID, list[Any]] = {}
        #: Devices taken over by another node while this node was still claiming them -> that node.
        self._lost: dict[UUID, tuple[str, int]] = {}
        #: Claims to make at the end of this turn: sessions take devices over, commands only free ones.
        self._claim_batch: dict[UUID, Device] = {}
        self._free_batch: dict[UUID, Device] = {}
        #: Devices under a claim for commands when a session attached: the session must take it over anyway.
        self._takeover_wanted: set[UUID] = set()
        self._claim_scheduled = False
        self._release_batch: list[tuple[UUID, int]] = []
        self._release_scheduled = False
        #: Devices whose owner is being looked up -> the messages waiting for the answer.
        self._resolving: dict[UUID, list[Any]] = {}
        #: device -> the node that holds it, as last learnt.
        self._owners: OrderedDict[UUID, str] = OrderedDict()
        #: node -> alive, from the heartbeats (a node not listed is assumed alive until the next heartbeat says).
        self.alive: dict[str, bool] = {}
        self._routed: dict[ReplyTo, _Routed] = {}
        self._deadlines = _Deadlines(clock, self._routed_timed_out)
        #: Devices with a session on this node (from the event stream), for the heartbeat's count.
        self.online: set[UUID] = set()
        self.routed_out = 0
        self.routed_in = 0
        local.route = self._route
        local.on_actor_retired = self._retired
        self.replies.remote = self._send_reply

    # --- the device port --------------------------------------------------------------------------------------------

    def attach(self, device: Device, session: DeviceSession, exclusive: bool = True) -> DeviceLink:
        """A session attaching here makes this node the device's holder (taking it over from another node)."""
        if device.id not in self.owned:
            if device.id in self._claiming:
                self._takeover_wanted.add(device.id)  # a claim for a command is under way: a session outranks it
            else:
                self._claim(device, take_over=True)
        self.tell_local(device, m.AttachSession(session, exclusive))
        return ActorLink(self, device, session.session_id)  # type: ignore[arg-type]

    def tell(self, device: Device, message: Any) -> None:
        self._route(device, message)

    def tell_local(self, device: Device, message: Any) -> Any:
        waiting = self._claiming.get(device.id)
        if waiting is not None:
            waiting.append(message)
            return None
        return self.local.tell_local(device, message)

    def existing(self, device_id: UUID) -> Any:
        return self.local.existing(device_id)

    def __len__(self) -> int:
        return len(self.local)

    def __contains__(self, device_id: UUID) -> bool:
        return device_id in self.local

    @property
    def request_ids(self) -> Any:
        return self.local.request_ids

    # --- routing ----------------------------------------------------------------------------------------------------

    def _route(self, device: Device, message: Any, hops: int = 0) -> None:
        device_id = device.id
        if device_id in self.owned or device_id in self._claiming:
            self.tell_local(device, message)
            return
        owner = self._owners.get(device_id)
        if owner is not None and self.alive.get(owner, True) and hops == 0:
            self._send_tell(owner, device, message, hops)
            return
        waiting = self._resolving.get(device_id)
        if waiting is not None:
            waiting.append(message)
            return
        self._resolving[device_id] = [message]
        self._owners.pop(device_id, None)
        d = self.store.owners([device_id], self.dead_after_ms)
        d.addCallbacks(self._resolved, self._resolve_failed, callbackArgs=(device, hops),
                       errbackArgs=(device,))

    def _resolved(self, owners: dict[UUID, Any], device: Device, hops: int) -> None:
        messages = self._resolving.pop(device.id, [])
        if device.id in self.owned or device.id in self._claiming:
            for message in messages:
                self.tell_local(device, message)
            return
        owner = owners.get(device.id)
        if owner is not None and owner.node_id != self.node and owner.alive and hops < MAX_HOPS:
            self._remember_owner(device.id, owner.node_id)
            self.alive[owner.node_id] = True
            for message in messages:
                self._send_tell(owner.node_id, device, message, hops)
            return
        dead_owner = owner is not None and owner.node_id != self.node and not owner.alive
        if dead_owner and self.alive.get(owner.node_id, True):
            self.node_died(owner.node_id)  # learnt before the heartbeat: no take-over waits for it
        for message in messages:
            if isinstance(message, m.SubmitRpc):
                if dead_owner and not message.command.persistent:
                    # The device's node died: a lightweight call fails now, not after its whole timeout.
                    self._answer(message.reply_to, RpcResult(failure=RpcFailure.DEVICE_OFFLINE))
                else:
                    self._claim(device, take_over=False)  # held nowhere (or by a dead node): hold it here
                    self.tell_local(device, message)
            elif isinstance(message, m.DeleteRpc):
                self._answer(message.reply_to, False)  # no node holds it in memory: nothing to take out
            elif isinstance(message, m.Inspect):
                self._answer(message.reply_to, None)
            elif not isinstance(message, m.DeviceRemoved):
                log.warn("cluster: {kind} for device {device_id} held nowhere dropped",
                         kind=type(message).__name__, device_id=device.id)

    def _resolve_failed(self, failure: Any, device: Device) -> None:
        log.failure("cluster: looking up the node of device {device_id} failed", failure, device_id=device.id)
        error = ServiceUnavailable("The cluster's database is unreachable")
        for message in self._resolving.pop(device.id, []):
            self._fail(getattr(message, "reply_to", None), error)

    def _remember_owner(self, device_id: UUID, node: str) -> None:
        self._owners[device_id] = node
        self._owners.move_to_end(device_id)
        while len(self._owners) > self.owner_cache_size:
            self._owners.popitem(last=False)

    def _send_tell(self, node: str, device: Device, message: Any, hops: int) -> None:
        try:
            body = codec.outgoing_message(message)  # written as it leaves (compact on a direct link)
        except codec.CodecError:
            log.warn("cluster: {kind} cannot be routed to node {node}", kind=type(message).__name__, node=node)
            return
        reply_to = getattr(message, "reply_to", None)
        if reply_to is not None:
            if self.replies.is_local(reply_to):
                self._track(node, reply_to, message)
            elif reply_to.node != node:
                # Passed on for another node's caller: its node must now wait on the new one (and fail fast if
                # that one dies, not if this one does).
                self.router.send(reply_to.node, {"t": "moved", "r": reply_to.correlation, "n": node})
        sent = self.router.send(node, {"t": "tell", "d": device.id, "m": body, "hops": hops})
        self.routed_out += 1
        if not sent:
            self._untrack(reply_to)
            self._fail(reply_to, ServiceUnavailable("Too many messages waiting for other nodes"))

    def _track(self, node: str, reply_to: ReplyTo, message: Any) -> None:
        self._untrack(reply_to)  # passed on again: one deadline, the latest
        lightweight = isinstance(message, m.SubmitRpc) and not message.command.persistent
        if lightweight:
            now = int(self.clock.seconds() * 1000)
            wait_ms = max(0, message.command.expiration_time - now) + EXPIRY_GRACE_MS
        else:
            wait_ms = self.route_timeout_ms
        self._routed[reply_to] = self._deadline(node, lightweight, reply_to, wait_ms)

    def _deadline(self, node: str, lightweight: bool, reply_to: ReplyTo, wait_ms: int) -> _Routed:
        slot = self._deadlines.slot_at(self.clock.seconds() + wait_ms / 1000.0)
        self._deadlines.add(reply_to, slot)
        return _Routed(node, lightweight, slot)

    def _untrack(self, reply_to: ReplyTo | None) -> _Routed | None:
        if reply_to is None:
            return None
        routed = self._routed.pop(reply_to, None)
        if routed is not None:
            self._deadlines.remove(reply_to, routed.slot)
        return routed

    def _routed_timed_out(self, reply_to: ReplyTo) -> None:
        routed = self._routed.pop(reply_to, None)
        if routed is not None:
            self.replies.fail(reply_to, RouteLost(f"Node {routed.node} did not answer in time"))

    def node_died(self, node: str) -> None:
        """Fail fast every call waiting on a dead node and forget which devices it held."""
        self.alive[node] = False
        for device_id in [d for d, n in self._owners.items() if n == node]:
            del self._owners[device_id]
        for reply_to, routed in list(self._routed.items()):
            if routed.node != node:
                continue
            self._untrack(reply_to)
            if routed.lightweight:
                self.replies.answer(reply_to, RpcResult(failure=RpcFailure.DEVICE_OFFLINE))
            else:
                self.replies.fail(reply_to, RouteLost(f"Node {node} stopped before it answered"))

    def _answer(self, reply_to: ReplyTo | None, value: Any) -> None:
        if reply_to is not None:
            self.replies.answer(reply_to, value)

    def _fail(self, reply_to: ReplyTo | None, error: BaseException) -> None:
        if reply_to is not None:
            self.replies.fail(reply_to, error)

    def _send_reply(self, reply_to: ReplyTo, value: Any, error: BaseException | None) -> None:
        envelope: dict[str, Any] = {"t": "reply", "r": reply_to.correlation}
        if error is None:
            envelope["v"] = codec.value_to_json(value)
        else:
            envelope["e"] = codec.error_to_json(error)
        if not self.router.send(reply_to.node, envelope):
            log.warn("cluster: answer for node {node} dropped (outbound queue full)", node=reply_to.node)

    # --- claims -----------------------------------------------------------------------------------------------------

    def _claim(self, device: Device, take_over: bool) -> None:
        """Hold the device here: its actor's mail waits until the claim is stored, the previous holder has let go,
        and the device's persistent commands are loaded. A session takes the device over from any node; a command
        claims it only if no live node holds it (else it goes there). Claims of one turn share one transaction."""
        if device.id in self._claiming or device.id in self.owned:
            return
        self._claiming[device.id] = []
        (self._claim_batch if take_over else self._free_batch)[device.id] = device
        if not self._claim_scheduled:
            self._claim_scheduled = True
            self.clock.callLater(0, self._claim_now)

    def _claim_now(self) -> None:
        self._claim_scheduled = False
        batch, self._claim_batch = self._claim_batch, {}
        free, self._free_batch = self._free_batch, {}
        if batch:
            ensureDeferred(self._complete_claims(batch, True))
        if free:
            ensureDeferred(self._complete_claims(free, False))

    async def _complete_claims(self, batch: dict[UUID, Device], take_over: bool) -> None:
        held: dict[UUID, Any] = {}
        try:
            if take_over:
                claims = await self.store.claim_devices(self.node, list(batch))
            else:
                claims, held = await self.store.claim_free_devices(self.node, list(batch), self.dead_after_ms)
        except Exception:
            log.failure("cluster: claiming {n} devices failed; serving them here unclaimed", n=len(batch))
            claims = {}
        claimed = []
        for device_id, device in batch.items():
            owner = held.get(device_id)
            if owner is not None:
                self._held_elsewhere(device, owner.node_id)
                continue
            claim = claims.get(device_id)
            if claim is not None:
                self.owned[device_id] = claim.epoch
                claimed.append([str(device_id), claim.epoch])
            ensureDeferred(self._take_over(device, claim))
        if claimed:
            self.router.broadcast({"t": "claimed", "d": claimed})

    def _held_elsewhere(self, device: Device, node: str) -> None:
        """A claim for commands found the device held by a live node: the commands go there (unless a session
        attached here meanwhile, which takes the device over after all)."""
        waiting = self._claiming.pop(device.id, [])
        self._remember_owner(device.id, node)
        self.alive[node] = True
        if device.id in self._takeover_wanted:
            self._takeover_wanted.discard(device.id)
            self._claim(device, take_over=True)
            self._claiming[device.id].extend(waiting)
            return
        for message in waiting:
            self._route(device, message)

    async def _take_over(self, device: Device, claim: Any) -> None:
        self._takeover_wanted.discard(device.id)
        try:
            previous = claim.previous_node if claim is not None else None
            if previous is not None and previous != self.node and self.alive.get(previous, True):
                await self._ask_release(previous, device, claim.epoch)
            records = await self.repository.load_device_active_rpcs(device.id)
        except DatabaseUnavailable:
            log.warn("cluster: device {device_id} served without its stored commands until the database is back",
                     device_id=device.id)
            self.repository.when_healthy().addCallback(lambda _: self._load_again(device))
            records = []
        except Exception:
            log.failure("cluster: taking device {device_id} over failed", device_id=device.id)
            records = []
        waiting = self._claiming.pop(device.id, [])
        lost = self._lost.pop(device.id, None)
        if lost is not None and lost[1] > self.owned.get(device.id, 0):
            # Another node claimed the device after us while we were loading: it serves the stored commands; our
            # sessions attach here and are then closed by the let-go, our commands go to the new holder.
            commands = [msg for msg in waiting if isinstance(msg, _ROUTABLE)]
            for message in waiting:
                if not isinstance(message, _ROUTABLE):
                    self.local.tell_local(device, message)
            self._let_go(device, lost[0])
            for message in commands:
                self._route(device, message)
            return
        if records:
            entries = [(record_command(r), r.status, r.seq, r.attempts) for r in records]
            self.local.tell_local(device, m.RestoreRpcs(entries))
        for message in waiting:
            self.local.tell_local(device, message)

    def _load_again(self, device: Device) -> None:
        """The database is back after a take-over could not load the device's stored commands: while its actor is
        still here, claim it again (if that failed too) or load them, so a device connected throughout gets its
        QUEUED commands without reconnecting (a restore skips the commands its actor already holds)."""
        if self.local.existing(device.id) is None or device.id in self._claiming:
            return
        if device.id not in self.owned:
            self._claim(device, take_over=True)
        else:
            ensureDeferred(self._take_over(device, None))

    def _ask_release(self, node: str, device: Device, epoch: int) -> Deferred[Any]:
        reply_to, answered = self.replies.expect()
        self._routed[reply_to] = self._deadline(node, False, reply_to, self.route_timeout_ms)
        self.router.send(node, {"t": "release", "d": str(device.id), "epoch": epoch, "r": reply_to.correlation})
        return answered.addErrback(lambda f: log.warn(
            "cluster: node {node} did not let device {device_id} go: {error}", node=node, device_id=device.id,
            error=f.getErrorMessage()))

    def _let_go(self, device: Device, new_node: str) -> Deferred[Any] | None:
        """Another node holds the device now: this node's actor closes its sessions and hands on its mail."""
        self.owned.pop(device.id, None)
        self._remember_owner(device.id, new_node)
        if self.local.existing(device.id) is None:
            return None
        reply_to, released = self.replies.expect()
        self.local.tell_local(device, m.Released(new_node, reply_to))
        return released

    def _retired(self, device: Device) -> None:
        """The device's actor passivated here: the node lets go of the device (conditionally on its epoch, so a
        later claim by another node is never undone)."""
        epoch = self.owned.pop(device.id, None)
        if epoch is None or device.id in self._claiming:
            return
        self._release_batch.append((device.id, epoch))
        if not self._release_scheduled:
            self._release_scheduled = True
            self.clock.callLater(0, self._release_now)

    def _release_now(self) -> None:
        self._release_scheduled = False
        batch, self._release_batch = self._release_batch, []
        if batch:
            self.store.release_devices(self.node, batch).addErrback(
                lambda f: log.failure("cluster: releasing {n} devices failed", f, n=len(batch)))

    # --- what other nodes send --------------------------------------------------------------------------------------

    def receive(self, envelope: dict[str, Any]) -> None:
        kind = envelope["t"]
        try:
            if kind == "tell":
                self._received_tell(envelope)
            elif kind == "reply":
                self._received_reply(envelope)
            elif kind == "release":
                ensureDeferred(self._received_release(envelope))
            elif kind == "claimed":
                self._received_claims(envelope)
            elif kind == "moved":
                self._received_moved(envelope)
        except (KeyError, ValueError, TypeError, codec.CodecError) as exc:
            log.warn("cluster: bad {kind} message from {node} dropped: {error}", kind=kind,
                     node=envelope.get("from"), error=exc)

    def _received_tell(self, envelope: dict[str, Any]) -> None:
        self.routed_in += 1
        device_id = codec.incoming_device(envelope["d"])
        message = codec.incoming_message(envelope["m"])
        hops = int(envelope.get("hops", 0)) + 1
        device = self.devices.cached_device(device_id)
        if device is not None:
            self._deliver_routed(device, message, hops)
            return

        def found(device: Device | None) -> None:
            if device is None:
                self._fail(getattr(message, "reply_to", None), NotFound("Device with requested id wasn't found!"))
            else:
                self._deliver_routed(device, message, hops)

        self.devices.get_device(device_id).addCallbacks(
            found, lambda f: self._fail(getattr(message, "reply_to", None), ServiceUnavailable()))

    def _deliver_routed(self, device: Device, message: Any, hops: int) -> None:
        if device.id in self.owned or device.id in self._claiming:
            reply_to = getattr(message, "reply_to", None)
            if reply_to is not None and self.replies.is_local(reply_to):
                self._untrack(reply_to)  # a call of this node that came back here: it waits on nobody else
            self.tell_local(device, message)
        else:
            # The sender thought this node holds the device; it does not (any more): find who does.
            self._owners.pop(device.id, None)
            self._route(device, message, hops)

    def _received_reply(self, envelope: dict[str, Any]) -> None:
        reply_to = ReplyTo(self.node, int(envelope["r"]))
        try:
            if "e" in envelope:
                error: BaseException | None = codec.error_from_json(envelope["e"])
            else:
                value = codec.value_from_json(envelope["v"])
                error = None
        except (codec.CodecError, KeyError, ValueError, TypeError) as exc:
            log.warn("cluster: unreadable answer from {node}: {error}", node=envelope.get("from"), error=exc)
            error = ServiceUnavailable("Another node's answer could not be read")
        self._untrack(reply_to)
        if error is not None:
            self.replies.fail(reply_to, error)
        else:
            self.replies.answer(reply_to, value)

    def _received_moved(self, envelope: dict[str, Any]) -> None:
        routed = self._routed.get(ReplyTo(self.node, int(envelope["r"])))
        if routed is not None:
            routed.node = str(envelope["n"])

    async def _received_release(self, envelope: dict[str, Any]) -> None:
        device_id = UUID(envelope["d"])
        new_node = str(envelope["from"])
        epoch = int(envelope.get("epoch", 0))
        answer_to = ReplyTo(new_node, int(envelope["r"]))
        if device_id in self._claiming:
            self._lost[device_id] = (new_node, epoch)
        elif self.owned.get(device_id, 0) < epoch:
            device = self.devices.cached_device(device_id) or await self.devices.get_device(device_id)
            if device is not None:
                released = self._let_go(device, new_node)
                if released is not None:
                    await released
        await self.journal.flushed()  # what the actor recorded is durable before the new node reads it
        self._send_reply(answer_to, True, None)

    def _received_claims(self, envelope: dict[str, Any]) -> None:
        new_node = str(envelope["from"])
        for raw_id, epoch in envelope["d"]:
            device_id = UUID(raw_id)
            if device_id in self._claiming:
                self._lost[device_id] = (new_node, int(epoch))
                continue
            if device_id in self.owned and self.owned[device_id] >= int(epoch):
                continue  # a claim older than ours
            self._remember_owner(device_id, new_node)
            if device_id in self.owned or self.local.existing(device_id) is not None:
                device = self.devices.cached_device(device_id)
                if device is not None:
                    self._let_go(device, new_node)
                else:
                    self.devices.get_device(device_id).addCallback(
                        lambda found, node=new_node: found is not None and self._let_go(found, node))

    def forget_owners_of(self, device_ids: list[UUID]) -> None:
        for device_id in device_ids:
            self._owners.pop(device_id, None)

    def pending_routed(self) -> int:
        return len(self._routed)

