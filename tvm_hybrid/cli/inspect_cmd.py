"""`tvm-hybrid inspect`: ops, shapes, parameters and FLOPs of a model; what a target supports."""

from __future__ import annotations

import collections

import click

from .output import emit_json
from .options import input_option


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", help="Check support against this target profile.")
@input_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def command(model: str, target: str | None, inputs, as_json: bool) -> None:
    """Show a model's ops, shapes, parameters and FLOPs, and which ops a target supports.

    \b
    tvm-hybrid inspect model.onnx --input x:1x3x224x224
    tvm-hybrid inspect model.onnx --target arm64 --json
    """
    import numpy as np

    from ..compiler import analysis, importer
    from ..targets import resolve

    profile = resolve(target) if target else None
    imp = importer.load(model, inputs)
    if profile is not None:
        from ..compiler.package import prepare

        imp = prepare(imp, profile)
    infos = analysis.analyze(imp, profile)
    params = sum(int(np.prod(t.dims)) for t in imp.model.graph.initializer)
    ops = collections.Counter(i.op_type for i in infos)
    unsupported = sorted({i.op_type for i in infos if not i.supported})
    doc = {
        "model": {"name": imp.name, "sha256": imp.sha256, "opset": imp.opset},
        "inputs": [t.to_dict() for t in imp.inputs],
        "outputs": [t.to_dict() for t in imp.outputs],
        "nodes": len(infos),
        "ops": dict(sorted(ops.items())),
        "params": params,
        "param_bytes": sum(i.param_bytes for i in infos),
        "flops": sum(i.flops for i in infos),
        "target": profile.name if profile else None,
        "unsupported_ops": unsupported,
        "layers": [i.to_dict() for i in infos],
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(f"model    {imp.name}  (opset {imp.opset}, sha256 {imp.sha256[:12]})")
    for t in imp.inputs:
        click.echo(f"input    {t.name}  {'x'.join(map(str, t.shape))}  {t.dtype}")
    for t in imp.outputs:
        click.echo(f"output   {t.name}  {'x'.join(map(str, t.shape))}  {t.dtype}")
    click.echo(f"nodes    {len(infos)} (after folding constants)")
    click.echo(f"params   {params:,} ({doc['param_bytes'] / 2**20:.2f} MiB)")
    click.echo(f"compute  {doc['flops'] / 1e9:.3f} GFLOP per run")
    click.echo("ops      " + ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())))
    if profile:
        if unsupported:
            click.echo(f"target   {profile.name}: unsupported: {', '.join(unsupported)}")
        else:
            click.echo(f"target   {profile.name}: every op supported")
