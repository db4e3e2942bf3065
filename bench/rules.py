"""Rule chains: what the root rule chain costs a REST RPC, and what a JavaScript node costs a message.

    python bench/rules.py                        # 200 devices, levels 8 64, 3 runs, 5 s windows; then the engine
    python bench/rules.py --runs 1 --levels 64 --messages 2000   # quicker

Part 1, REST two-way RPC (bench/rpc.py's machinery: ``twistd -n nanoiot``, ``nanoiot-sim`` devices answering every
command, wrk or the asyncio client, server CPU from /proc), in three variants, each on a fresh server, interleaved
within every run so that a shared machine's drift hits them alike:

- ``bypass``: ``--rules-bypass`` (no rule service at all: the command service has no interceptor);
- ``default``: ThingsBoard's default root chain, which REST RPC goes through as in ThingsBoard; since the chain only
  sends the command ("RPC Request to Device" -> RPC Call Request, nothing after it) the command goes directly;
- ``engine``: a root chain that makes every command pass the engine (Message Type Switch -> Message Type Filter ->
  RPC Call Request, loaded with ``--rule-chain``), for scale: what a chain that does something costs.

Per variant and concurrency level: RPC/s, p50/p99, server CPU µs per RPC (median, min–max over the runs).

Part 2, in this process on the real reactor: N messages through a chain of one JavaScript transformation node
(ThingsBoard's default script ``return {msg: msg, metadata: metadata, msgType: msgType};`` on a small telemetry
message) with 64 messages in flight, two script threads; and the same N through a chain of one Message Type Switch
(no script) for the engine's own share. Reports wall µs/message and this process's CPU µs/message.

Part 3, in this process: ``RuleService.intercept`` (the command service's hook) with the default root chain, per
command, against a plain Python call: what "the default chain costs nothing" means in nanoseconds.

Writes bench/results/rules.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import Server, machine, provision_devices, write_result  # noqa: E402
from bench.loadgen import wait_for_quiet  # noqa: E402
from bench.rpc import WRK, Bench, _git_state  # noqa: E402

#: A root chain that sends every command through the engine (the switch, a filter, then RPC Call Request).
ENGINE_CHAIN = {
    "ruleChain": {"name": "Through the engine", "type": "CORE"},
    "metadata": {
        "firstNodeIndex": 0,
        "nodes": [
            {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch",
             "configuration": {"version": 0}},
            {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeFilterNode", "name": "commands",
             "configuration": {"messageTypes": ["RPC_CALL_FROM_SERVER_TO_DEVICE"]}},
            {"type": "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode", "name": "RPC Call Request",
             "configuration": {"timeoutInSeconds": 60}},
        ],
        "connections": [{"fromIndex": 0, "toIndex": 1, "type": "RPC Request to Device"},
                        {"fromIndex": 1, "toIndex": 2, "type": "True"}],
    },
}
VARIANTS = ("bypass", "default", "engine")


class RulesBench(Bench):
    """bench/rpc.py's Bench with the server's rule options of one variant."""

    def __init__(self, args: argparse.Namespace, console: Console, variant: str) -> None:
        super().__init__(args, console)
        self.variant = variant

    def start_server(self) -> None:
        extra: list[str] = []
        if self.variant == "bypass":
            extra = ["--rules-bypass"]
        elif self.variant == "engine":
            chain_file = self.work / "engine_chain.json"
            chain_file.write_text(json.dumps(ENGINE_CHAIN))
            extra = ["--rule-chain", str(chain_file)]
        self.server = Server(workdir=Path(tempfile.mkdtemp(prefix="server-", dir=self.work)), extra=extra).start()
        devices = provision_devices(self.server.database, self.args.devices)
        self.device_ids = [device_id for device_id, _ in devices]
        (self.work / "tokens.txt").write_text("\n".join(token for _, token in devices) + "\n")
        (self.work / "ids.txt").write_text("\n".join(self.device_ids) + "\n")
        self.jwt = self.server.login()


def rest_part(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for run in range(1, args.runs + 1):
        for variant in args.variants:
            load = wait_for_quiet(args.max_load, args.load_wait, console.print)
            bench = RulesBench(args, console, variant)
            try:
                bench.start_server()
                bench.start_sim("echo")
                for level in args.levels:
                    row = bench.measure("twoway", level, None)
                    row.update(run=run, variant=variant, loadavg_before_run=load)
                    rows.append(row)
                    console.print(f"  run {run} {variant:8} C={level:<4} {row['rps']:>8,.0f} RPC/s  "
                                  f"p50 {row['p50_ms']} p99 {row['p99_ms']} ms  errors {row['error_rate']:.2%}  "
                                  f"server {row['server_cpu_us_per_rpc']} µs/RPC  others {row['other_cores']} cores")
                bench.stop_sim()
            finally:
                bench.close()
    return rows


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}


def rest_summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for variant in args.variants:
        for level in args.levels:
            mine = [r for r in rows if r["variant"] == variant and r["level"] == level]
            if not mine:
                continue
            out.append({"variant": variant, "level": level, "runs": len(mine),
                        **{key: summarize([r[key] for r in mine]) for key in
                           ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_rpc", "error_rate", "other_cores")}})
    return out


# --- part 2: the engine and one JavaScript node --------------------------------------------------------------------

def engine_part(messages: int, in_flight: int) -> dict[str, Any]:
    from twisted.internet import defer, reactor

    from nanoiot.rules.chain import load_chain
    from nanoiot.rules.engine import RuleEngine
    from nanoiot.rules.message import EntityId, RuleMessage
    from nanoiot.rules.scripts import ScriptRunner

    class Context:
        clock = reactor
        tenant_id = uuid4()

        def log(self, text: str) -> None:
            pass

    def chain_of(node: dict[str, Any]) -> Any:
        return load_chain({"ruleChain": {"name": "bench", "type": "CORE"},
                           "metadata": {"firstNodeIndex": 0, "nodes": [node], "connections": []}})

    transform = chain_of({"type": "org.thingsboard.rule.engine.transform.TbTransformMsgNode", "name": "transform",
                          "configuration": {"scriptLang": "JS",
                                            "jsScript": "return {msg: msg, metadata: metadata, msgType: msgType};"}})
    switch = chain_of({"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch",
                       "configuration": {"version": 0}})
    scripts = ScriptRunner(reactor, timeout_ms=1000, threads=2, max_pending=10 * in_flight)
    scripts.startService()
    context = Context()
    engine = RuleEngine(None, scripts)
    device = EntityId("DEVICE", uuid4())
    results: dict[str, Any] = {}

    async def run(name: str, chain: Any, count: int) -> dict[str, Any]:
        failures_before = engine.stats.node_errors + engine.stats.timeouts
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < count:
                sent += 1
                msg = RuleMessage.create("POST_TELEMETRY_REQUEST", device, {"temperature": 21.5, "n": sent},
                                         {"deviceName": "bench", "deviceType": "default"})
                await engine.process(chain, msg, context)  # type: ignore[arg-type]

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(in_flight)])
        wall = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return {"chain": name, "messages": count, "in_flight": in_flight, "wall_s": round(wall, 3),
                "wall_us_per_message": round(wall / count * 1e6, 1), "messages_per_s": round(count / wall, 1),
                "cpu_us_per_message": round(cpu / count * 1e6, 1),
                "failed": engine.stats.node_errors + engine.stats.timeouts - failures_before}

    async def main() -> None:
        try:
            await run("warm-up", transform, min(500, messages))
            results["switch"] = await run("one Message Type Switch (no script)", switch, messages)
            results["transform"] = await run("one JavaScript transformation", transform, messages)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addErrback(
        lambda f: (results.setdefault("error", f.getTraceback()), None)))
    reactor.run()
    scripts.stop()
    if "transform" in results:
        results["js_node_us_per_message"] = round(results["transform"]["wall_us_per_message"]
                                                  - results["switch"]["wall_us_per_message"], 1)
    return results


# --- part 3: what the command service's hook costs a command (in this process, no reactor) ------------------------

def hook_part(calls: int) -> dict[str, Any]:
    """``RuleService.intercept`` with ThingsBoard's default root chain, per call, against a plain function call."""
    from twisted.internet import task
    from twisted.internet.defer import succeed

    from nanoiot.actors.replies import Replies
    from nanoiot.commands.events import EventStream
    from nanoiot.commands.service import Initiator
    from nanoiot.config import Config
    from nanoiot.persistence.records import NULL_UUID, Device
    from nanoiot.rpc.body import RpcBody
    from nanoiot.rules.server import RuleService

    class Store:
        def list_root_chains(self) -> Any:
            return succeed([])

    class Commands:
        interceptor: Any = None

    class Directory:
        device_calls: Any = None

    clock = task.Clock()
    rules = RuleService(Config(), clock, Store(), Commands(), None, None, None, Replies(), EventStream(),  # type: ignore[arg-type]
                        scripts=object(), engine=object())
    rules.install(Directory())
    tenant = uuid4()
    device = Device(uuid4(), 0, tenant, NULL_UUID, "d", "default", None, None)
    initiator = Initiator(tenant, None, uuid4())
    body = RpcBody("echo", {"i": 1}, 10000, 10000, False, None, None, uuid4(), None)
    intercept = rules.intercept

    def nothing(initiator: Any, device: Any, body: Any, oneway: bool) -> None:
        return None

    def timed(fn: Any) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                fn(initiator, device, body, False)
            best = min(best, time.perf_counter() - started)
        return best / calls * 1e9

    assert intercept(initiator, device, body, False) is None  # the default chain: the command goes directly
    hook_ns, baseline_ns = timed(intercept), timed(nothing)
    return {"calls": calls, "intercept_ns_per_command": round(hook_ns, 1),
            "plain_call_ns": round(baseline_ns, 1), "hook_cost_ns": round(hook_ns - baseline_ns, 1)}


def print_rest(console: Console, summary: list[dict[str, Any]], runs: int) -> None:
    table = Table(title=f"two-way REST RPC, median (min–max) of {runs} run(s)")
    for column in ("variant", "C", "RPC/s", "p50 ms", "p99 ms", "server µs/RPC", "errors", "others' cores"):
        table.add_column(column, justify="right")

    def fmt(s: dict[str, Any], digits: int = 1) -> str:
        return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"

    for p in summary:
        table.add_row(p["variant"], str(p["level"]), fmt(p["rps"], 0), fmt(p["p50_ms"], 2), fmt(p["p99_ms"], 2),
                      fmt(p["server_cpu_us_per_rpc"], 0), f"{p['error_rate']['median']:.2%}",
                      fmt(p["other_cores"], 2))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--levels", type=int, nargs="*", default=[8, 64])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client", choices=("wrk", "python"), default="wrk" if WRK else "python")
    parser.add_argument("--messages", type=int, default=5000, help="part 2: messages per chain")
    parser.add_argument("--in-flight", type=int, default=64, help="part 2: messages in the engine at once")
    parser.add_argument("--hook-calls", type=int, default=200_000, help="part 3: intercept calls per timing")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--load-wait", type=float, default=60.0)
    parser.add_argument("--skip-rest", action="store_true", help="part 2 only")
    parser.add_argument("--output", default="rules")
    args = parser.parse_args()
    # What bench/rpc.py's Bench reads.
    args.drain, args.rate_connections, args.profile = 15.0, 64, []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console(width=150)
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    if not args.skip_rest:
        rows = rest_part(args, console)
        summary = rest_summary(rows, args)
        print_rest(console, summary, args.runs)
    hook = hook_part(args.hook_calls)
    console.print(f"hook: RuleService.intercept with the default root chain {hook['intercept_ns_per_command']} ns "
                  f"per command (a plain call {hook['plain_call_ns']} ns)")
    console.print(f"engine: {args.messages} messages per chain, {args.in_flight} in flight")
    engine = engine_part(args.messages, args.in_flight)
    for key in ("switch", "transform"):
        if key in engine:
            e = engine[key]
            console.print(f"  {e['chain']:40} {e['wall_us_per_message']:>8} µs/message wall  "
                          f"{e['cpu_us_per_message']:>8} µs CPU  {e['messages_per_s']:>10,.0f} msg/s  "
                          f"failed {e['failed']}")
    if "js_node_us_per_message" in engine:
        console.print(f"  one JS node: {engine['js_node_us_per_message']} µs/message (wall, over the switch alone)")
    if "error" in engine:
        console.print(engine["error"])
    path = write_result(args.output, {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "git": _git_state(),
        "settings": {k: v for k, v in vars(args).items()}, "rest_summary": summary, "hook": hook, "engine": engine,
        "rest_runs": rows, "loadavg_end": os.getloadavg()[0]})
    console.print(f"results written to {path}")


if __name__ == "__main__":
    main()
