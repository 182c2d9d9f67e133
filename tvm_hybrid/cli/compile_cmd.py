"""`tvm-hybrid compile`: build artifacts for one or more targets."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .output import emit_json
from .options import input_option, plan_options, plan_settings

log = logging.getLogger("tvm_hybrid.cli")


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", "targets", multiple=True, required=True,
              help="Target profile (repeatable); `host` picks this machine's best.")
@input_option
@plan_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--tuning-logs", type=click.Path(file_okay=False), default=None,
              help="Tuning-log root whose <target>/ database is applied "
                   "(default: $TVM_HYBRID_TUNING_LOGS or the repository's tuning_logs/).")
@click.option("--no-tuning-logs", is_flag=True, help="Default schedules only; apply no tuning log.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Device arithmetic: fp16 halves the weights (fp32 accumulation), on targets with fast fp16 "
                   "(CUDA, Vulkan, arm64 cores with FP16); elsewhere exit 3.")
@click.option("--adaptive", is_flag=True,
              help="Build several candidate cuts (the plan's over a grid of bandwidths and cloud speeds); the "
                   "runtime picks one per call from the link and cloud it measures.")
@click.option("--max-cuts", type=click.IntRange(min=1), default=6, show_default=True,
              help="With --adaptive: at most this many cuts (those optimal under the most conditions).")
@click.option("--decoder", is_flag=True,
              help="A language model's decoder (input_ids, start, past_*/present_* KV cache; scripts/gguf_decoder.py "
                   "writes one): decode and prefill segments over one weights file, for `tvm-hybrid generate`.")
@click.option("--weights", "weight_mode", type=click.Choice(["q4", "q8", "fp32"]), default=None,
              help="With --decoder: matmul and embedding weights quantized per group of 32 and kept packed "
                   "(q4: 4-bit, embeddings 8-bit; default q4), or fp32.")
@click.option("--chunk", default="16,128", show_default=True,
              help="With --decoder: prefill chunk sizes in tokens (comma-separated).")
@click.option("--split-layers", type=click.IntRange(min=1), default=None, metavar="K",
              help="With --decoder: the device runs the embeddings and layers 0..K-1, the cloud the rest "
                   "(default: as many layers as --memory holds; all when the model fits).")
@click.option("--json", "as_json", is_flag=True, help="One JSON summary on stdout.")
def command(model: str, targets: tuple[str, ...], inputs, output: str, tuning_logs: str | None,
            no_tuning_logs: bool, precision: str, adaptive: bool, max_cuts: int, decoder: bool,
            weight_mode: str | None, chunk: str, split_layers: int | None, as_json: bool, **kw) -> None:  # fmt: skip
    """Compile an ONNX model into one artifact per target: OUT/<target>/ (and OUT/<cloud>/ when
    the plan sends segments to the cloud).

    \b
    tvm-hybrid compile det.onnx --target host --input x:1x3x320x320 -o dist/
    tvm-hybrid compile det.onnx -t x86-64 -t x86-64-avx2 --input x:1x3x320x320 -o dist/ --json
    tvm-hybrid compile det.onnx -t x86-64 --input x:1x3x640x640 --memory 20MiB -o dist/   # split
    tvm-hybrid compile det.onnx -t x86-64 --input x:1x3x640x640 --adaptive -o dist/       # cut per call
    tvm-hybrid compile decoder.onnx -t host --decoder --weights q4 -o dist/llm/            # for generate
    """
    from ..compiler.tuning_log import default_logs_dir
    from ..errors import UsageError

    if tuning_logs and no_tuning_logs:
        raise UsageError("--tuning-logs and --no-tuning-logs contradict each other; give one")
    if tuning_logs and not Path(tuning_logs).is_dir():
        raise UsageError(f"--tuning-logs {tuning_logs} is not a directory (tune into it with `tvm-hybrid tune --logs`)")
    logs = None if no_tuning_logs else Path(tuning_logs) if tuning_logs else default_logs_dir()
    if decoder:
        summaries = _compile_decoder(model, targets, inputs, output, logs, precision, adaptive, weight_mode, chunk,
                                     split_layers, kw)  # fmt: skip
    else:
        if weight_mode is not None or split_layers is not None:
            raise UsageError(f"{'--weights' if weight_mode else '--split-layers'} applies to --decoder builds"
                             + ("; to shrink other models, `tvm-hybrid quantize` them to int8" if weight_mode else ""))  # fmt: skip
        summaries = _compile(model, targets, inputs, output, logs, precision, adaptive, max_cuts, kw)
    if as_json:
        emit_json({"model": model, "artifacts": [s.to_dict() for s in summaries]})
        return
    for s in summaries:
        where = " + ".join(s.placement) or "no"  # (every output a constant: nothing to run)
        click.echo(f"{s.path}  {where} segment(s), {s.files} files, "
                   f"{s.bytes / 2**20:.2f} MiB, {s.seconds:.1f} s, "
                   f"{s.kernels['tuned']} kernels tuned, {s.kernels['default']} default")  # fmt: skip


def _compile_decoder(model, targets, inputs, output, logs, precision, adaptive, weight_mode, chunk, split_layers, kw):
    from ..compiler import plan as planner
    from ..compiler.decoder import compile_decoder
    from ..errors import UsageError

    cloud, settings = plan_settings(kw)
    used = [flag for flag, on in (("--input", inputs), ("--precision fp16", precision != "fp32"), ("--adaptive", adaptive),
                                  ("--bandwidth", settings.bandwidth), ("--rtt", settings.rtt)) if on]  # fmt: skip
    if used:
        raise UsageError(f"{', '.join(used)} do not apply to --decoder builds (the sequence length is the chunk's; "
                         "a decoder splits by --memory or --split-layers)")  # fmt: skip
    if len(targets) > 1 and (settings.memory or split_layers):
        raise UsageError("a split decoder is compiled for one --target at a time")
    try:
        chunks = tuple(int(c) for c in chunk.split(",") if c.strip())
    except ValueError:
        raise UsageError(f"--chunk {chunk!r}: comma-separated token counts, like 16,128") from None
    mode = None if weight_mode == "fp32" else (weight_mode or "q4")
    memory = planner.parse_size(settings.memory) if settings.memory else None
    return [s for t in targets
            for s in compile_decoder(Path(model), t, Path(output), chunks, mode, logs, memory, split_layers, cloud)]


def _compile(model, targets, inputs, output, logs, precision, adaptive, max_cuts, kw):
    from ..compiler.package import CompileOptions, compile_model

    cloud, settings = plan_settings(kw)
    opts = CompileOptions(model=Path(model), targets=targets, output=Path(output), inputs=inputs,
                          cloud=cloud, plan=settings, tuning_logs=logs, precision=precision,
                          adaptive=adaptive, max_cuts=max_cuts)  # fmt: skip
    log.info(
        "compiling %s for %s%s into %s",
        model,
        ", ".join(targets),
        "".join(f" --input {i.name}:{'x'.join(map(str, i.shape))}" for i in inputs),
        output,
    )
    return compile_model(opts)
