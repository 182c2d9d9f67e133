"""`tvm-hybrid plan`: where each op runs (device or cloud), why, and the predicted latency."""

from __future__ import annotations

import click

from .output import emit_json
from .options import input_option, plan_options, plan_settings


@click.command("plan")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", required=True, help="Device target profile.")
@input_option
@plan_options
@click.option("--adaptive", is_flag=True,
              help="Also list the candidate cuts `compile --adaptive` would build (and plot them with --plot).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG: per-layer cost with the split, latency vs bandwidth.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def command(model: str, target: str, inputs, adaptive: bool, plot: str | None, as_json: bool, **kw) -> None:
    """Show the device/cloud split and why, per op, with predicted latencies.

    \b
    tvm-hybrid plan det.onnx --target x86-64 --input x:1x3x640x640 --bandwidth 100Mbps --rtt 20ms
    tvm-hybrid plan det.onnx -t x86-64 --input x:1x3x640x640 --memory 2MiB --json
    """
    from ..compiler import importer
    from ..compiler.package import describe_plan, plan_graph, prepare
    from ..targets import resolve

    cloud_name, settings = plan_settings(kw)
    device = resolve(target)
    cloud = resolve(cloud_name) if cloud_name else None
    imp = prepare(importer.load(model, inputs), device)
    graph = plan_graph(imp, device, cloud, settings)  # once: the plot re-solves it per bandwidth
    doc = describe_plan(imp, graph, device, cloud, settings)
    cuts = None
    if adaptive:
        if cloud is None:
            from ..errors import UsageError

            raise UsageError("--adaptive lists cuts between device and cloud; it needs a cloud (not --cloud none)")
        from ..compiler.package import describe_cuts

        cuts = describe_cuts(graph, settings.options(device))
        doc["cuts"] = [{k: v for k, v in c.items() if k != "on_device"} for c in cuts]
    if plot:
        from ..compiler.plot import plot_plan

        plot_plan(graph, imp, device, cloud, settings, doc, plot, cuts)
        doc["plot"] = plot
    if as_json:
        emit_json(doc)
        return
    p = doc["predicted"]
    click.echo(f"model    {imp.name} on {device.name}" + (f" + {cloud.name}" if cloud else "")
               + f"   link {doc['link']['bandwidth_bps'] / 1e6:g} Mbps, RTT {doc['link']['rtt_ms']:g} ms")  # fmt: skip
    for seg in doc["segments"]:
        why = f"  ({seg['reason']})" if seg.get("reason") else ""
        click.echo(f"segment {seg['id']}  {seg['placement']:6s}  {len(seg['nodes'])} ops, "
                   f"predicted {seg['predicted']['ms']:.3f} ms{why}")  # fmt: skip
        if seg["placement"] == "cloud":
            sent = sum(_nbytes(t) for t in seg["inputs"])
            click.echo(f"           sends {', '.join(t['name'] for t in seg['inputs'])} ({sent / 1e3:.1f} kB)")
    for name in ("all-device", "all-cloud"):
        b = doc["baselines"][name]
        click.echo(f"{name:10s} {b['total_ms']:.3f} ms" if b else f"{name:10s} infeasible")
    click.echo(f"{'plan':10s} {p['total_ms']:.3f} ms  (device {p['device_ms']:.3f} + transfer {p['transfer_ms']:.3f} "
               f"+ RTT {p['rtt_ms']:.3f} + cloud {p['cloud_ms']:.3f})")  # fmt: skip
    mem = doc["device_memory"]
    click.echo(f"memory     {mem['total'] / 2**20:.2f} MiB on the device (weights {mem['weights'] / 2**20:.2f}, "
               f"activations {mem['activations'] / 2**20:.2f}) of {doc['memory_budget'] / 2**20:.0f} MiB")  # fmt: skip
    cloud_ops = [o for o in doc["ops"] if o["placement"] == "cloud"]
    for o in cloud_ops[:20]:
        click.echo(f"  cloud  {o['name']} ({o['op']}): {o['reason']}")
    if len(cloud_ops) > 20:
        click.echo(f"  … {len(cloud_ops) - 20} more cloud ops (--json lists every op)")
    for c in doc.get("cuts", []):
        p = c["predicted"]
        click.echo(f"cut {c['name']:14s} {c['device_ops']:4d} ops on the device, sends {p['bytes_up'] / 1e3:.1f} kB, "
                   f"gets {p['bytes_down'] / 1e3:.1f} kB; {p['total_ms']:.3f} ms at this link; best in "
                   f"{len(c['optimal_for'])} of the grid's conditions")  # fmt: skip
    if plot:
        click.echo(f"plot     {plot}")


def _nbytes(t: dict) -> int:
    import numpy as np

    return int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
