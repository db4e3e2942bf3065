"""Plot latency against load from bench/results/rpc.json into bench/results/rpc_latency.png.

    python bench/plot.py [--input bench/results/rpc.json] [--output bench/results/rpc_latency.png]

One panel per mode (one-way, two-way). Closed-loop levels are drawn at the RPC/s they achieved (solid lines,
labelled C=concurrency), open-loop points at the rate offered (dashed lines): p50, p95 and p99, medians over the
runs, on a log scale. The targets are drawn in grey: 10,000 one-way RPC/s; 5,000 two-way RPC/s and p99 <= 20 ms
at 2,000 RPC/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {"p50_ms": "tab:green", "p95_ms": "tab:orange", "p99_ms": "tab:red"}
TITLES = {"oneway": "one-way RPC (REST → MQTT → PUBACK)", "twoway": "two-way RPC (REST → MQTT → answer)"}


def plot(data: dict, output: Path) -> None:
    points = data["summary"]
    kinds = [k for k in ("oneway", "twoway") if any(p["kind"] == k for p in points)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 5.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        closed = sorted((p for p in points if p["kind"] == kind and p["rate"] is None),
                        key=lambda p: p["level"])
        opened = sorted((p for p in points if p["kind"] == kind and p["rate"] is not None),
                        key=lambda p: p["rate"])
        for key, colour in COLOURS.items():
            label = key.replace("_ms", "")
            if closed:
                xs = [p["rps"]["median"] for p in closed]
                ys = [p[key]["median"] for p in closed]
                ax.plot(xs, ys, "o-", color=colour, label=f"{label}, closed loop (x = achieved)")
                if key == "p99_ms":
                    for p, x, y in zip(closed, xs, ys):
                        ax.annotate(f"C={p['level']}", (x, y), textcoords="offset points", xytext=(4, 6),
                                    fontsize=7, color="0.3")
            if opened:
                xs = [p["rate"] for p in opened]
                ys = [p[key]["median"] for p in opened]
                ax.plot(xs, ys, "s--", color=colour, alpha=0.75, label=f"{label}, open loop (x = offered)")
        ax.set_yscale("log")
        ax.set_xlabel("RPC/s")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(TITLES[kind])
        ax.grid(True, which="both", alpha=0.3)
        xmax = max([p["rps"]["median"] or 0 for p in closed] + [p["rate"] for p in opened] + [1])
        if kind == "twoway":
            xmax = max(xmax, 2000)
        notes = []
        if kind == "twoway":
            ax.axhline(20, color="0.5", linestyle=":", linewidth=1)
            ax.axvline(2000, color="0.5", linestyle=":", linewidth=1)
            notes.append("dotted: target p99 ≤ 20 ms at 2,000 RPC/s")
            target = 5000
        else:
            target = 10000
        if xmax * 1.15 >= target:
            ax.axvline(target, color="0.5", linestyle="--", linewidth=1)
            notes.append(f"dashed: target {target:,} RPC/s")
        else:
            notes.append(f"target {target:,} RPC/s: beyond this axis")
        ax.text(0.98, 0.02, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color="0.35")
        ax.set_xlim(0, xmax * 1.15)
        ax.legend(fontsize=7, loc="upper left")
    m = data.get("machine", {})
    settings = data.get("settings", {})
    fig.suptitle(f"NanoIoT RPC latency vs load — {settings.get('devices', '?')} devices, "
                 f"{m.get('cpus', '?')} cores ({m.get('cpu', '?')}), load generator and simulator on the same "
                 f"machine; {m.get('date', '')}", fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=RESULTS / "rpc.json")
    parser.add_argument("--output", type=Path, default=RESULTS / "rpc_latency.png")
    args = parser.parse_args(argv)
    plot(json.loads(args.input.read_text()), args.output)
    print(f"plot written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
