"""`tvm-hybrid quantize`: post-training static int8, calibrated on the user's samples, QDQ ONNX out."""

from __future__ import annotations

import click

from .output import emit_json


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calibration", "-c", required=True, metavar="DIR",
              help="Calibration samples: one .npz per sample, keyed by input name.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The QDQ ONNX model to write.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True,
              help="How activation ranges are calibrated.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--exclude", multiple=True, metavar="NODE|OP",
              help="Keep this node (by name) or every node of this op type in fp32. Repeatable.")
@click.option("--accuracy-budget", metavar="PCT",
              help="Keep the most sensitive layers fp32 until the accuracy loss is within this, e.g. 1%.")
@click.option("--op-types", default=",".join(["Conv", "ConvTranspose", "MatMul", "Gemm"]), show_default=True,
              metavar="OP,OP|all", help="The op types to quantize; `all`: every one onnxruntime can (the ops between too).")
@click.option("--holdout", type=click.FloatRange(0, 0.5), default=0.2, show_default=True,
              help="Fraction of the samples held out of calibration for the accuracy report.")
@click.option("--calibration-cache", type=click.Path(dir_okay=False), default=None,
              help="Where the calibrated ranges are kept (default: a content-keyed file in ~/.cache/tvm-hybrid).")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON document on stdout.")
def command(model: str, calibration: str, output: str, method: str, per_channel: bool, exclude: tuple[str, ...],
            accuracy_budget: str | None, op_types: str, holdout: float, calibration_cache: str | None, as_json: bool) -> None:  # fmt: skip
    """Quantize a model to int8 (QDQ ONNX: u8 activations, s8 weights) calibrated on your samples,
    and report its accuracy against fp32 on held-out samples.

    \b
    tvm-hybrid quantize cls.onnx --calibration calib/ -o cls.int8.onnx
    tvm-hybrid quantize det.onnx -c calib/ -o det.int8.onnx --method percentile --accuracy-budget 1% --json

    The accuracy loss is top-1 disagreement for outputs a Softmax produces, else the relative L2
    error; the model's is its worst output's. The output compiles with `tvm-hybrid compile`.
    """
    from ..compiler import quantize as q
    from ..compiler.samples import parse_budget

    budget = parse_budget(accuracy_budget)
    report = q.quantize(model, calibration, output, method=method, per_channel=per_channel, exclude=exclude,
                        budget=budget, holdout=holdout, cache=calibration_cache,
                        op_types="all" if op_types == "all" else [t.strip() for t in op_types.split(",") if t.strip()])  # fmt: skip
    if as_json:
        emit_json(report.to_dict())
        return
    r = report
    held = "the calibration samples (too few to hold some out)" if r.heldout_is_calibration else f"{r.heldout_samples} held-out samples"
    click.echo(f"quantized  {r.model} -> {r.output}  ({r.method}, {'per-channel' if r.per_channel else 'per-tensor'}, "
               f"{r.calibration_samples} calibration samples)")  # fmt: skip
    click.echo(f"size       {r.fp32_bytes / 2**20:.2f} MiB -> {r.int8_bytes / 2**20:.2f} MiB "
               f"({r.int8_bytes / r.fp32_bytes:.2f}x); {r.quantized_nodes} compute nodes int8")  # fmt: skip
    click.echo(f"accuracy   against fp32 on {held}:")
    for o in r.outputs:
        top1 = f"  top-1 agreement {100 * o.top1:.2f}%" if o.top1 is not None else ""
        click.echo(f"  {o.name}: max abs {o.max_abs:.4g}  mean abs {o.mean_abs:.4g}  cosine {o.cosine:.6f}"
                   f"  rel L2 {o.rel_l2:.4g}{top1}")  # fmt: skip
    verdict = "" if r.budget is None else (f", within the {100 * r.budget:g}% budget" if r.within_budget
                                           else f", OVER the {100 * r.budget:g}% budget")  # fmt: skip
    click.echo(f"loss       {100 * r.loss:.3f}%{verdict}")
    if r.kept_fp32:
        shown = ", ".join(r.kept_fp32[:8]) + (f", … ({len(r.kept_fp32)} in all)" if len(r.kept_fp32) > 8 else "")
        click.echo(f"fp32 kept  {shown}")
