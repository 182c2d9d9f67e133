"""`tvm-hybrid tune`: MetaSchedule tuning into the target's tuning log."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click

from .output import emit_json
from .options import input_option

log = logging.getLogger("tvm_hybrid.cli")


@click.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", required=True, help="Target profile; `host` picks this machine's best.")
@input_option
@click.option("--trials", type=int, default=None,
              help="Measured trials wanted for the model's kernels, records already in the log included "
                   "(default: 16 per kernel). A rerun continues up to it; raise it to tune further.")
@click.option("--trials-per-task", type=int, default=None, help="At most this many trials for any one kernel.")
@click.option("--max-minutes", type=float, default=None, help="Stop (keeping every record) after this long.")
@click.option("--logs", type=click.Path(file_okay=False), default=None,
              help="Tuning-log root; the database goes to LOGS/<target>/ "
                   "(default: $TVM_HYBRID_TUNING_LOGS or the repository's tuning_logs/).")
@click.option("--rpc-tracker", metavar="HOST:PORT", default=None,
              help="Measure on devices from this TVM RPC tracker (with --rpc-key).")
@click.option("--rpc-key", metavar="KEY", default=None, help="The device key the RPC servers registered with.")
@click.option("--num-cores", type=int, default=None,
              help="Cores of the measuring device (default: this machine's, or asked from the RPC device).")
@click.option("--population", type=int, default=512, show_default=True,
              help="Evolutionary search population per round; smaller is faster and explores less.")
@click.option("--seed", type=int, default=None, help="Random seed of the search.")
@click.option("--no-model-check", is_flag=True,
              help="Skip timing the tuned kernels in place in the model against their defaults "
                   "(on by default when tuning on this machine's CPU).")
@click.option("--json", "as_json", is_flag=True, help="One JSON report on stdout.")
def command(model, target, inputs, trials, trials_per_task, max_minutes, logs, rpc_tracker, rpc_key, num_cores,
            population, seed, no_model_check, as_json) -> None:  # fmt: skip
    """Tune a model's kernels with MetaSchedule for a target, into LOGS/<target>/.

    Records are saved as they are measured: Ctrl-C (or a kill) keeps them, and the same
    command run again continues where it stopped. `compile` applies the log of its target.

    \b
    tvm-hybrid tune cls.onnx --target host --input x:1x3x48x192 --trials 400
    tvm-hybrid tune det.onnx -t x86-64-avx2 --input x:1x3x320x320 --max-minutes 60
    tvm-hybrid tune det.onnx -t arm64-cortex-a76 --input x:1x3x320x320 --rpc-tracker 10.0.0.5:9190 --rpc-key rk3588
    """
    from ..compiler.tune import TuneOptions, TuningInterrupted, tune_model
    from ..compiler.tuning_log import default_logs_dir

    opts = TuneOptions(
        model=Path(model),
        target=target,
        inputs=inputs,
        trials=trials,
        trials_per_task=trials_per_task,
        max_minutes=max_minutes,
        logs=Path(logs) if logs else default_logs_dir(),
        rpc_tracker=rpc_tracker,
        rpc_key=rpc_key,
        num_cores=num_cores,
        seed=seed,
        population=population,
        check_in_model=not no_model_check,
    )
    log.info(
        "tuning %s for %s into %s%s",
        model,
        target,
        opts.logs,
        f" on devices {rpc_key!r} from tracker {rpc_tracker}" if rpc_tracker else " on this machine",
    )
    show = logging.getLogger("tvm_hybrid").isEnabledFor(logging.INFO)
    with _progress(Path(model).stem, show) as on_progress:
        try:
            report = tune_model(opts, on_progress=on_progress)
        except TuningInterrupted as e:
            if e.report is not None and not as_json:
                _table(e.report)
            raise
    if as_json:
        emit_json(report.to_dict())
        return
    _table(report)


@contextlib.contextmanager
def _progress(name: str, show: bool):
    """A rich progress bar on stderr: trials, tasks, best model kernel time, time left."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} trials"),
        TextColumn("tasks {task.fields[tasks]}"),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[left]}"),
        console=console,
        transient=False,
    )
    bar = progress.add_task(f"tune {name}", total=1, tasks="-", best="", left="")

    def on_progress(p) -> None:
        if p.phase == "baseline":
            progress.update(bar, description=f"tune {name}: default schedules", total=max(p.budget, 1))
            return
        if p.phase == "in-model check":
            progress.update(bar, description=f"tune {name}: timing tuned kernels in the model")
            return
        best = ""
        if p.best_ms is not None:
            best = f"best {p.best_ms:.3f} ms" + (f" (default {p.default_ms:.3f})" if p.default_ms else "")
        left = ""
        if p.trials < p.budget:
            eta = p.elapsed / p.trials * (p.budget - p.trials) if p.trials else None
            if p.deadline is not None:
                eta = p.deadline if eta is None else min(eta, p.deadline)
            left = f"~{_duration(eta)} left" if eta is not None else ""
        progress.update(
            bar,
            description=f"tune {name}" + (f": {p.task}" if p.task and p.phase == "tuning" else ""),
            completed=min(p.trials, p.budget),
            total=max(p.budget, 1),
            tasks=f"{p.tasks_done}/{p.tasks}",
            best=best,
            left=left,
        )

    # Log lines (ours, on stderr) must go through the live display, not under it.
    handlers = [h for h in logging.getLogger("tvm_hybrid").handlers if isinstance(h, logging.StreamHandler)]
    with progress:
        old = [h.setStream(sys.stderr) for h in handlers]
        try:
            yield on_progress
        finally:
            for h, s in zip(handlers, old):
                h.setStream(s)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _table(report) -> None:
    """Per kernel: trials, default schedule vs the best tuned record, and the model total."""
    from rich.console import Console
    from rich.table import Table

    def ms(v):
        return "-" if v is None else f"{v:.4f}"

    def speedup(d, t):
        return "-" if d is None or t is None or t <= 0 else f"{d / t:.2f}x"

    table = Table(title=f"{report.target}: {report.trials} trials in {report.seconds:.0f} s ({report.stopped})")
    for col in ("#", "kernel", "weight", "trials", "records", "default ms", "tuned ms", "speedup"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    slower = False
    for i, t in enumerate(report.tasks):
        errors = t.build_errors + t.run_errors
        kept = t.tuned_ms is not None and t.applied_ms != t.tuned_ms
        slower = slower or kept
        table.add_row(
            str(i), t.name, str(t.weight), f"{t.trials}" + (f" ({errors} failed)" if errors else ""), str(t.records),
            ms(t.default_ms), ms(t.tuned_ms) + (" *" if kept else ""), speedup(t.default_ms, t.applied_ms),
        )  # fmt: skip
    table.add_section()
    table.add_row("", "model (sum of weight x kernel)", "", str(report.trials), str(sum(t.records for t in report.tasks)),
                  ms(report.default_ms), ms(report.tuned_ms), speedup(report.default_ms, report.tuned_ms))  # fmt: skip
    console = Console()
    console.print(table)
    if slower:
        console.print("* slower than the default schedule (alone, or in place in the model): "
                      "builds keep the default for that kernel")
    if report.in_model_checked:
        console.print(f"in-model check: {report.in_model_slower} of {report.in_model_checked} tuned kernels "
                      "were slower in place in the model than their default schedule")
    console.print(f"database: {report.database}")
