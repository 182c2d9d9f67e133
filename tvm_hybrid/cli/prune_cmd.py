"""`tvm-hybrid prune`: magnitude pruning, unstructured or whole channels, with an accuracy report."""

from __future__ import annotations

import click

from .output import emit_json


@click.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--sparsity", type=float, required=True, help="Fraction of weights (or channels) to remove, e.g. 0.5.")
@click.option("--structured", type=click.Choice(["channels"]), default=None,
              help="Remove whole output channels of convolutions (a smaller, faster model) instead of zeroing weights.")
@click.option("--calibration", "-c", required=True, metavar="DIR",
              help="Samples to measure accuracy on: one .npz per sample, keyed by input name.")
@click.option("--accuracy-budget", metavar="PCT", help="Lower the sparsity until the accuracy loss is within this, e.g. 1%.")
@click.option("--holdout", type=click.FloatRange(0, 0.5), default=0.2, show_default=True,
              help="Fraction of the samples the report is measured on.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The pruned ONNX model to write.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON document on stdout.")
def command(model: str, sparsity: float, structured: str | None, calibration: str, accuracy_budget: str | None,
            holdout: float, output: str, as_json: bool) -> None:  # fmt: skip
    """Prune a model by weight magnitude and report size, FLOPs, onnxruntime latency and accuracy
    before and after.

    \b
    tvm-hybrid prune model.onnx --sparsity 0.5 -c calib/ -o model.pruned.onnx
    tvm-hybrid prune model.onnx --sparsity 0.3 --structured channels -c calib/ --accuracy-budget 1% -o small.onnx
    """
    from ..compiler.prune import prune
    from ..compiler.samples import parse_budget

    r = prune(model, calibration, output, sparsity, structured=structured, budget=parse_budget(accuracy_budget),
              holdout=holdout)  # fmt: skip
    if as_json:
        emit_json(r.to_dict())
        return
    b, a = r.before, r.after
    how = f"{r.channels_removed} channels of {r.pruned_layers} convolutions" if r.structured else f"{r.pruned_layers} layers"
    click.echo(f"pruned     {r.model} -> {r.output}  (sparsity {r.sparsity:.3f}"
               f"{f', asked {r.sparsity_asked:.3f}' if r.sparsity != r.sparsity_asked else ''}; {how})")  # fmt: skip
    click.echo(f"params     {b.params:,} -> {a.params:,}  (nonzero {b.nonzero:,} -> {a.nonzero:,})")
    click.echo(f"size       {b.file_bytes / 2**20:.2f} -> {a.file_bytes / 2**20:.2f} MiB; gzip "
               f"{b.gzip_bytes / 2**20:.2f} -> {a.gzip_bytes / 2**20:.2f} MiB")  # fmt: skip
    click.echo(f"compute    {b.gflops:.3f} -> {a.gflops:.3f} GFLOP")
    click.echo(f"latency    {b.ms:.2f} -> {a.ms:.2f} ms (onnxruntime, median of 20)")
    held = "the calibration samples" if r.heldout_is_calibration else f"{r.heldout_samples} held-out samples"
    click.echo(f"accuracy   against the unpruned model on {held}:")
    for o in r.outputs:
        top1 = f"  top-1 agreement {100 * o.top1:.2f}%" if o.top1 is not None else ""
        click.echo(f"  {o.name}: max abs {o.max_abs:.4g}  mean abs {o.mean_abs:.4g}  rel L2 {o.rel_l2:.4g}{top1}")
    verdict = "" if r.budget is None else f", within the {100 * r.budget:g}% budget"
    click.echo(f"loss       {100 * r.loss:.3f}%{verdict}")
