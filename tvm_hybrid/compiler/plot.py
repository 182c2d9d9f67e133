"""`plan --plot`: per-layer compute and transfer size with the split, and latency vs bandwidth."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import UsageError


def plot_plan(graph, imported, device, cloud, settings, doc: dict, path: str, cuts: list | None = None) -> None:
    """Draw the plan (``doc``, from describe_plan) and, re-solving ``graph`` per bandwidth, the
    predicted latency of all-device, all-cloud and the plan against the link's speed; with
    ``cuts`` (package.describe_cuts), each candidate cut's too."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'tvm-hybrid[plot]' (or matplotlib)") from None
    from .package import solve_plan
    from .plan import parse_bandwidth

    ops = doc["ops"]
    fig, axes = plt.subplots(3 if cuts else 2, 1, figsize=(11, 12 if cuts else 8), constrained_layout=True)
    ax1, ax3 = axes[0], axes[1]
    xs = range(len(ops))
    dev = [o["device_ms"] or 0.0 for o in ops]
    colors = ["tab:blue" if o["placement"] == "device" else "tab:orange" for o in ops]
    ax1.bar(xs, dev, color=colors, width=1.0)
    ax1.set_ylabel("predicted device ms per op")
    ax1.set_xlabel("op, in graph order (blue: device, orange: cloud)")
    ax2 = ax1.twinx()
    ax2.plot(xs, [o["output_bytes"] / 1e3 for o in ops], color="tab:green", lw=1)
    ax2.set_ylabel("output size, kB (what a cut there sends)", color="tab:green")
    first_cloud = next((i for i, o in enumerate(ops) if o["placement"] == "cloud"), None)
    if first_cloud is not None:
        ax1.axvline(first_cloud - 0.5, color="red", ls="--", label="split")
        ax1.legend(loc="upper right")
    ax1.set_title(f"{imported.name}: {device.name}" + (f" + {cloud.name}" if cloud else ""))

    if cloud is not None:
        rates = [parse_bandwidth(f"{r}Mbps") for r in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)]
        series = {"all-device": [], "all-cloud": [], "hybrid plan": []}
        for r in rates:
            s = dataclasses.replace(settings, bandwidth=f"{r / 1e6}Mbps")
            plan = solve_plan(graph, device, cloud, s)
            for k in ("all-device", "all-cloud"):
                b = plan.baselines[k]
                series[k].append(b.total_ms if b else float("nan"))
            series["hybrid plan"].append(plan.cost.total_ms)
        for k, v in series.items():
            ax3.plot([r / 1e6 for r in rates], v, marker="o", label=k, ls="--" if k != "hybrid plan" else "-")
        ax3.set_xscale("log")
        ax3.set_yscale("log")
        ax3.set_xlabel("bandwidth, Mbps")
        ax3.set_ylabel("predicted end-to-end latency, ms")
        ax3.set_title(f"RTT {doc['link']['rtt_ms']:g} ms")
        ax3.legend()
        ax3.grid(True, which="both", alpha=0.3)
    else:
        ax3.set_axis_off()
    if cuts:
        _plot_cuts(axes[2], graph, cuts, doc["link"]["rtt_ms"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cuts(ax, graph, cuts: list, rtt: float) -> None:
    """Each candidate cut's predicted latency against bandwidth, and the cut the runtime would pick
    at each (the lowest; markers on it), at the plan's RTT."""
    from .plan import GRID_BANDWIDTHS, Link, evaluate

    rates = GRID_BANDWIDTHS
    series = {c["name"]: [evaluate(graph, c["on_device"], Link(r, rtt)).total_ms for r in rates] for c in cuts}
    for name, v in series.items():
        ax.plot([r / 1e6 for r in rates], v, lw=1.2, label=name)
    chosen = [min(series, key=lambda n: series[n][i]) for i in range(len(rates))]
    ax.plot([r / 1e6 for r in rates], [series[c][i] for i, c in enumerate(chosen)], "ko", ms=4, label="chosen")
    for i, c in enumerate(chosen):
        if i == 0 or c != chosen[i - 1]:
            ax.annotate(c, (rates[i] / 1e6, series[c][i]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth, Mbps")
    ax.set_ylabel("predicted latency, ms")
    ax.set_title(f"candidate cuts (compile --adaptive) at RTT {rtt:g} ms: the runtime picks the lowest")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
