"""Runs messages through rule chains: ThingsBoard's routing, with guards so that no node can stall anything.

Routing, as ThingsBoard's RuleChainActorMessageProcessor does it:
- a node's (relation, message) goes to every connection of that node whose label equals the relation ignoring
  case; several connections copy the message (each copy with its own id);
- a relation with no connection ends that copy: quietly for any relation but Failure; a Failure with no connection
  is logged and counted (``stats.failures_unhandled``), never raised to the caller.

Guards, each sending the message down the node's Failure:
- a node that raises, or whose Deferred fails;
- a node that has not answered within its deadline (``node_timeout``, or the node's own ``deadline``): the
  Deferred is cancelled and a late answer is ignored;
- a message that went through ``max_hops`` nodes (across chains too: the count travels with the message and its
  copies) is not given to another node: it ends as failed, logged and counted, as ThingsBoard's "processed by more
  than N rule nodes" (routing it down Failure would only feed the loop).

Nothing here blocks: node I/O returns Deferreds, scripts run in the script runner's threads, and routing is a loop
over a queue, so that a long chain of synchronous nodes does not grow the stack.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.ids import uuid4
from nanoiot.rules.chain import RuleChain
from nanoiot.rules.context import NodeContext, RuleContext, Scripts
from nanoiot.rules.message import FAILURE, RuleMessage
from nanoiot.rules.nodes.base import NodeSpec, Outputs, failure

__all__ = ["EngineStats", "RuleEngine"]

log = Logger(namespace="nanoiot.rules")


@dataclass
class EngineStats:
    """Counters for metrics and tests."""

    #: Messages given to ``process``.
    messages: int = 0
    node_runs: int = 0
    #: Nodes that raised or failed (their message went down Failure).
    node_errors: int = 0
    #: Nodes that missed their deadline (their message went down Failure).
    timeouts: int = 0
    #: Failures with no Failure connection: the message ended as failed.
    failures_unhandled: int = 0
    #: Messages stopped by the ``max_hops`` guard.
    hops_exceeded: int = 0
    #: Other relations with no connection: the message ended there (ThingsBoard acks it).
    dropped: int = 0
    #: Messages that reached an Output node.
    outputs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


ContextFactory = Callable[[UUID], RuleContext]


class RuleEngine:
    """Runs messages through loaded chains; one per server (chains and contexts are passed in per message)."""

    def __init__(self, context_factory: ContextFactory | RuleContext | None, scripts: Scripts, *,
                 max_hops: int = 64, node_timeout: float = 10.0, clock: IReactorTime | None = None) -> None:
        """``context_factory``: the server's context for a tenant id (or one context for all); used when
        ``process`` is not given a context. ``clock``: for node deadlines (else the context's clock)."""
        self.context_factory = context_factory
        self.scripts = scripts
        self.max_hops = max_hops
        self.node_timeout = node_timeout
        self.clock = clock
        self.stats = EngineStats()

    def context_for(self, tenant_id: UUID | None) -> RuleContext:
        factory = self.context_factory
        if factory is None:
            raise TypeError("RuleEngine has no context factory: pass a context to process()")
        if hasattr(factory, "send_rpc"):
            return factory  # type: ignore[return-value]
        if tenant_id is None:
            raise TypeError("process() needs a context or a tenant id")
        return factory(tenant_id)  # type: ignore[operator]

    def process(self, chain: RuleChain, msg: RuleMessage, context: RuleContext | None = None,
                tenant_id: UUID | None = None) -> Deferred[list[tuple[str, RuleMessage]]]:
        """Run ``msg`` through ``chain`` from its first node until every copy has ended. Fires with what the
        chain's Output nodes emitted, (output node name, message) (for a Rule Chain input node that called this
        chain); never fails."""
        self.stats.messages += 1
        if context is None:
            context = self.context_for(tenant_id)
        if chain.first is None:
            return succeed([])
        ctx = context if isinstance(context, NodeContext) else NodeContext(context, self.scripts)
        return _Run(self, chain, ctx, self.clock or ctx.clock).start(msg)


class _Run:
    """One message's way through one chain: the copies still travelling, and what Output nodes emitted."""

    def __init__(self, engine: RuleEngine, chain: RuleChain, ctx: NodeContext, clock: IReactorTime) -> None:
        self.engine = engine
        self.stats = engine.stats
        self.chain = chain
        self.ctx = ctx
        self.clock = clock
        self.queue: deque[tuple[int, RuleMessage]] = deque()
        self.pending = 0
        self.draining = False
        self.emitted: list[tuple[str, RuleMessage]] = []
        self.done: Deferred[list[tuple[str, RuleMessage]]] = Deferred()

    def start(self, msg: RuleMessage) -> Deferred[list[tuple[str, RuleMessage]]]:
        assert self.chain.first is not None
        self.enqueue(self.chain.first, msg)
        self.drain()
        return self.done

    def enqueue(self, index: int, msg: RuleMessage) -> None:
        self.pending += 1
        self.queue.append((index, msg))

    def drain(self) -> None:
        if self.draining:
            return  # the loop below picks it up
        self.draining = True
        try:
            while self.queue:
                index, msg = self.queue.popleft()
                try:
                    self.run_node(index, msg)
                except Exception:  # a bug of ours: the copy ends, the run goes on
                    log.failure("rule chain {chain}: routing failed at node {index}", chain=self.chain.name,
                                index=index)
                    self.copy_ended()
        finally:
            self.draining = False
        if self.pending == 0 and not self.done.called:
            self.done.callback(self.emitted)

    def copy_ended(self) -> None:
        self.pending -= 1
        if not self.draining:
            self.drain()

    # --- one node -------------------------------------------------------------------------------------------------

    def run_node(self, index: int, msg: RuleMessage) -> None:
        spec = self.chain.node(index)
        if msg.hops >= self.engine.max_hops:
            self.stats.hops_exceeded += 1
            log.warn("rule chain {chain}: message {msg_id} is processed by more than {max_hops} rule nodes! "
                     "It ends before node {index} ({node})", chain=self.chain.name, msg_id=msg.id,
                     max_hops=self.engine.max_hops, index=index, node=spec.name)
            self.copy_ended()
            return
        msg = msg.with_(hops=msg.hops + 1)
        self.stats.node_runs += 1
        node = spec.node
        try:
            result = node.on_message(msg, self.ctx)
        except Exception as e:
            self.node_failed(spec, msg, Failure(e))
            return
        if not isinstance(result, Deferred):
            self.route(spec, msg, result)
            return
        deadline = self.deadline_of(node, msg)
        call = _Call(self, spec, msg, result)
        if deadline is not None and not result.called:
            call.timer = self.clock.callLater(deadline, call.timed_out, deadline)
        result.addCallbacks(call.answered, call.failed)

    def deadline_of(self, node: Any, msg: RuleMessage) -> float | None:
        deadline = getattr(node, "deadline", None)
        if deadline is None:
            return self.engine.node_timeout
        return deadline(msg, int(self.clock.seconds() * 1000), self.engine.node_timeout)

    def node_failed(self, spec: NodeSpec, msg: RuleMessage, reason: Failure) -> None:
        self.stats.node_errors += 1
        error = reason.value
        text = f"{type(error).__name__}: {error}"
        log.debug("rule chain {chain}: node {index} ({node}) failed on message {msg_id}: {error}",
                  chain=self.chain.name, index=spec.index, node=spec.name, msg_id=msg.id, error=text)
        self.route(spec, msg, [failure(msg, text)])

    def route(self, spec: NodeSpec, msg: RuleMessage, outputs: Any) -> None:
        """Send each (relation, message) a node emitted along its connections; then this copy has ended."""
        if not _valid(outputs):
            self.stats.node_errors += 1
            outputs = [failure(msg, f"node returned {type(outputs).__name__}, not a list of (relation, message)")]
        if getattr(spec.node, "output", False):
            self.emitted.extend(outputs)
            self.stats.outputs += len(outputs)
            self.copy_ended()
            return
        sent: set[tuple[int, str]] = set()
        for relation, out in outputs:
            key = (id(out), relation.lower())
            if key in sent:  # one message on "one" and "ONE" takes each connection once
                continue
            sent.add(key)
            if out.error is not None and relation.lower() != FAILURE.lower():
                out = out.with_(error=None)  # passed on by a node that did not fail: the old reason is stale
            targets = self.chain.targets(spec.index, relation)
            if not targets:
                if relation.lower() == FAILURE.lower():
                    self.stats.failures_unhandled += 1
                    log.warn("rule chain {chain}: node {index} ({node}) sent message {msg_id} down Failure, which "
                             "has no connection: {error}", chain=self.chain.name, index=spec.index, node=spec.name,
                             msg_id=out.id, error=out.error)
                else:
                    self.stats.dropped += 1
                continue
            if len(targets) == 1:
                self.enqueue(targets[0], out)
            else:
                for target in targets:
                    self.enqueue(target, out.with_(id=uuid4()))
        self.copy_ended()


def _valid(outputs: Any) -> bool:
    return isinstance(outputs, list) and all(
        isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) and isinstance(o[1], RuleMessage)
        for o in outputs)


class _Call:
    """A node's pending answer for one message, and its deadline."""

    __slots__ = ("msg", "result", "run", "settled", "spec", "timer")

    def __init__(self, run: _Run, spec: NodeSpec, msg: RuleMessage, result: Deferred[Outputs]) -> None:
        self.run = run
        self.spec = spec
        self.msg = msg
        self.result = result
        self.timer: IDelayedCall | None = None
        self.settled = False

    def settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        return True

    def answered(self, outputs: Any) -> None:
        if self.settle():
            self.run.route(self.spec, self.msg, outputs)

    def failed(self, reason: Failure) -> None:
        if self.settle():
            self.run.node_failed(self.spec, self.msg, reason)

    def timed_out(self, deadline: float) -> None:
        if not self.settle():
            return
        self.run.stats.timeouts += 1
        log.warn("rule chain {chain}: node {index} ({node}) did not answer within {deadline} s",
                 chain=self.run.chain.name, index=self.spec.index, node=self.spec.name, deadline=deadline)
        self.result.cancel()  # its errback finds the call settled
        self.run.route(self.spec, self.msg, [failure(self.msg, f"node did not answer within {deadline:g} s")])
