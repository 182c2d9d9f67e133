"""MetaSchedule tuning into one JSON database per target profile: tuning_logs/<target>/."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .. import hostcpu
from ..errors import HybridError, RuntimeFailure, UsageError, one_line
from ..targets import TargetProfile, resolve
from . import backends, build, importer, tuning_log

log = logging.getLogger(__name__)

#: The trial budget when --trials is not given: this many per task.
DEFAULT_TRIALS_PER_TASK = 16
# MetaSchedule commits a failed trial with this run time.
_FAILED_SECS = 1e10
# Give up early when this many trials in, nothing has built (or run).
_FAIL_FAST_TRIALS = 16


class TuningInterrupted(HybridError):
    """Tuning was stopped by a signal; every record measured before it is saved (exit 130)."""

    exit_code = 130

    def __init__(self, message: str, report: TuneReport | None = None) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# options and results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """Everything `tvm-hybrid tune` needs, resolved before the long work starts."""

    model: Path
    target: str
    inputs: tuple[importer.InputOverride, ...] = ()
    #: Measured trials wanted for this model's kernels in the database, counting the records
    #: already there (so a rerun after an interruption continues); default 16 per task.
    trials: int | None = None
    #: At most this many measured trials for any one kernel (records already there count).
    trials_per_task: int | None = None
    max_minutes: float | None = None
    logs: Path = dataclasses.field(default_factory=tuning_log.default_logs_dir)
    rpc_tracker: str | None = None  # HOST:PORT
    rpc_key: str | None = None
    #: Cores of the device that runs the kernels (MetaSchedule's num-cores); default: asked.
    num_cores: int | None = None
    #: Candidates measured per round for one task; default from the budget.
    trials_per_iter: int | None = None
    seed: int | None = None
    #: Seconds one measurement may take before it counts as failed.
    run_timeout: float = 60.0
    #: The evolutionary search's population (smaller is faster, explores less).
    population: int = 512
    #: After tuning on this machine's CPU, time the tuned kernels in place in the model
    #: against their defaults, and have builds keep the default where it was faster there.
    check_in_model: bool = True


@dataclasses.dataclass
class TaskReport:
    """One kernel: its default schedule against the best the database holds."""

    name: str
    weight: int
    flops: float
    default_ms: float | None
    tuned_ms: float | None  # the record a build applies: the best valid one
    trials: int  # measured in this run (failed ones included)
    records: int  # measured records in the database for this kernel, all runs
    build_errors: int = 0
    run_errors: int = 0
    #: (default, tuned) ms of this kernel timed in place in the whole model, when checked
    in_model: tuple[float, float] | None = None

    @property
    def applied_ms(self) -> float | None:
        """The kernel's time in a build with this log: the tuned record only where it is faster,
        alone and, when checked, in the model."""
        if self.tuned_ms is None or (self.default_ms is not None and self.default_ms <= self.tuned_ms):
            return self.default_ms
        if self.in_model is not None and self.in_model[1] >= self.in_model[0]:
            return self.default_ms
        return self.tuned_ms


@dataclasses.dataclass
class TuneReport:
    """What a tuning run did, per task and in total."""

    target: str
    database: Path
    tasks: list[TaskReport]
    trials: int
    budget: int
    seconds: float
    stopped: str  # "budget", "time", "interrupted", "nothing-to-do", "exhausted"
    runner: str
    first_error: str | None = None
    #: Tuned kernels the in-model check timed, and how many of them were slower in place.
    in_model_checked: int = 0
    in_model_slower: int = 0

    @property
    def default_ms(self) -> float | None:
        """Kernel time of the whole model with default schedules (sum of weight × kernel)."""
        vals = [t.weight * t.default_ms for t in self.tasks if t.default_ms is not None]
        return sum(vals) if len(vals) == len(self.tasks) else None

    @property
    def tuned_ms(self) -> float | None:
        """Kernel time of the model as a build with this log makes it (per kernel, the faster of
        its tuned record and its default schedule)."""
        vals = [t.weight * t.applied_ms for t in self.tasks if t.applied_ms is not None]
        return sum(vals) if len(vals) == len(self.tasks) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "database": str(self.database),
            "trials": self.trials,
            "budget": self.budget,
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "runner": self.runner,
            "default_ms": self.default_ms,
            "tuned_ms": self.tuned_ms,
            "in_model_checked": self.in_model_checked,
            "in_model_slower": self.in_model_slower,
            "tasks": [{**dataclasses.asdict(t), "applied_ms": t.applied_ms} for t in self.tasks],
        }


@dataclasses.dataclass
class Progress:
    """A snapshot for progress displays, sent after every measured batch."""

    phase: str  # "baseline", "tuning", "done"
    tasks: int
    tasks_done: int
    trials: int  # measured in this run
    budget: int  # trials this run may measure
    elapsed: float  # seconds since measuring candidates started
    deadline: float | None  # seconds left under --max-minutes
    best_ms: float | None  # model kernel time with the best schedules so far
    default_ms: float | None
    task: str = ""


# --------------------------------------------------------------------------------------------
# building and running candidates
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fast_getmodule():
    """Make ``inspect.getmodule`` cheap for frames of pseudo-files (``<string>``, ``<frozen …>``).

    TVMScript calls ``inspect.stack()`` for every ``@T.prim_func``; for a frame whose file is
    not a real file, ``getmodule`` scans every loaded module and finds nothing. Importing
    ``tvm.s_tir.tensor_intrin`` (hundreds of prim_funcs, imported by every MetaSchedule
    TuneContext and by each LocalBuilder worker) took 13-38 s here because of it; answering
    None for those frames up front, which is what the scan returns, makes it about 2 s.
    """
    import inspect

    orig = inspect.getmodule

    def getmodule(obj, _filename=None):
        if _filename and _filename[:1] == "<" and _filename[-1:] == ">" and inspect.isframe(obj):
            return None
        return orig(obj, _filename)

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = orig


def _import_tensor_intrin() -> None:
    import sys

    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        t0 = time.perf_counter()
        with _fast_getmodule():
            import tvm.s_tir.tensor_intrin  # noqa: F401
        log.debug("imported tvm.s_tir.tensor_intrin in %.1f s", time.perf_counter() - t0)


def _make_builder(scratch: Path, profile: TargetProfile):
    """A MetaSchedule builder that compiles in this process.

    MetaSchedule's LocalBuilder compiles in fresh popen workers whose first build imports
    ``tvm.s_tir.tensor_intrin`` — longer than its timeout on a slow machine, so every
    candidate came back "Build errors" and nothing was measured. Here each candidate is
    compiled and linked (with the profile's C++ compiler, so remote devices need none) right
    here, each in its own directory (MetaSchedule's RemoveBuildArtifact deletes the directory).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    fcompile = build.linker(profile)

    @derived_object
    class InProcessBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                self.count += 1
                out = Path(tempfile.mkdtemp(prefix=f"b{self.count}-", dir=scratch))
                try:
                    path = _build_kernel(bi.mod, bi.target, out / f"kernel{self.count}.so", fcompile, profile)
                    results.append(BuilderResult(str(path), None))
                except Exception as e:  # a candidate that does not compile is a failed trial
                    shutil.rmtree(out, ignore_errors=True)
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def _build_kernel(mod, target, path: Path, fcompile, profile: TargetProfile) -> Path:
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    # As MetaSchedule's default_build: measure with the weight layout rewrite taken out.
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with backends.for_profile(profile).compile_context(profile), target:
        rt_mod = tvm.compile(mod, target=target)
    rt_mod.export_library(str(path), fcompile=fcompile)
    return path


def _parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"bad --rpc-tracker {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def _evaluator(ms, profile: TargetProfile):
    """How each candidate is timed.

    On CPUs, with the weights and outputs flushed from the caches before every run (the first
    argument, the input, stays hot, as the previous layer left it): in a model each conv reads
    its own weights cold, and schedules timed with everything in cache won in isolation but lost
    in the model (PP-OCRv4 det on x86-64-avx2: three conv kernels 1.7x slower in place).
    One run per repeat, so every timed run follows a flush.
    """
    if backends.for_profile(profile).cpu:
        return ms.runner.EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)
    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)


def _make_runner(opts: TuneOptions, evaluator):
    from tvm.s_tir import meta_schedule as ms

    if opts.rpc_tracker:
        host, port = _parse_tracker(opts.rpc_tracker)
        config = ms.runner.RPCConfig(
            tracker_host=host,
            tracker_port=port,
            tracker_key=opts.rpc_key,
            session_priority=1,
            session_timeout_sec=int(opts.run_timeout),
        )
        return ms.runner.RPCRunner(config, evaluator_config=evaluator, max_workers=1), (
            f"rpc://{host}:{port}/{opts.rpc_key}"
        )
    # LocalRunner's one popen worker imports only the runtime side of MetaSchedule (about 1 s,
    # checked once at construction), not tensor_intrin.
    return ms.runner.LocalRunner(timeout_sec=opts.run_timeout, evaluator_config=evaluator), "local"


def _remote_cores(opts: TuneOptions) -> int:
    """Check the tracker has a device with the key, and ask it how many threads its TVM runtime uses."""
    import socket

    from tvm import rpc

    host, port = _parse_tracker(opts.rpc_tracker or "")
    where = f"the RPC tracker at {host}:{port}"
    try:  # TVM's own client retries a refused connection for a minute; fail at once instead
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise RuntimeFailure(f"cannot reach {where} ({e.strerror or e}); is the tracker running "
                             "(python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190)?") from e  # fmt: skip
    try:
        tracker = rpc.connect_tracker(host, port)
        keys = sorted({item["key"].split(":", 1)[-1] for item in tracker.summary().get("server_info", [])})
        if opts.rpc_key not in keys:
            raise RuntimeFailure(
                f"no device with key {opts.rpc_key!r} is registered with {where} (keys there: "
                f"{', '.join(keys) or 'none'}); start one: python -m tvm.exec.rpc_server "
                f"--tracker {host}:{port} --key {opts.rpc_key}"
            )
        sess = tracker.request(opts.rpc_key, priority=1, session_timeout=60, max_retry=2)
        return int(sess.get_function("runtime.NumThreads")())
    except RuntimeFailure:
        raise
    except Exception as e:
        first = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise RuntimeFailure(f"cannot get a device with key {opts.rpc_key!r} from {where} "
                             f"({first[-1][:200] if first else type(e).__name__})") from e  # fmt: skip


def _tuning_target(profile: TargetProfile, cores: int):
    import tvm

    target = dict(profile.tvm_target)
    if backends.for_profile(profile).cpu:  # MetaSchedule's CPU rules need the core count
        target["num-cores"] = cores
    if profile.tvm_host is not None:
        return tvm.target.Target(target, host=dict(profile.tvm_host))
    return tvm.target.Target(target)


def _measure_defaults(tasks, builder, runner, target, profile: TargetProfile) -> list[float | None]:
    """Each kernel's time with the schedule a build without tuning logs gives it."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    backend = backends.for_profile(profile)
    inputs, args = [], []
    for task in tasks:
        # A copy: the task's module is what tuning starts from and must stay unscheduled.
        with target:
            mod = backend.schedule(task.dispatched[0].clone(), profile)
        inputs.append(BuilderInput(mod, target))
        args.append(ArgInfo.from_prim_func(mod["main"]))
    built = builder.build(inputs)
    runner_inputs, index = [], []
    for i, b in enumerate(built):
        if b.error_msg is None:
            runner_inputs.append(RunnerInput(b.artifact_path, backend.device, args[i]))
            index.append(i)
        else:
            log.debug("default schedule of %s did not build: %s", tasks[i].task_name, b.error_msg)
    out: list[float | None] = [None] * len(tasks)
    for i, fut in zip(index, runner.run(runner_inputs)):
        res = fut.result()
        if res.error_msg is None and res.run_secs:
            out[i] = build.median_ms(res.run_secs)
        else:
            log.debug("default schedule of %s did not run: %s", tasks[i].task_name, res.error_msg)
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# the run's state, the task scheduler and the measure callback
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """Counts, best times and stop conditions shared by the scheduler and the callback."""

    names: list[str]
    weights: list[int]
    existing: list[int]  # measured records per task before this run
    best: list[float | None]  # ms: the best record, from the database and this run
    budget: int
    cap: int | None
    deadline: float | None  # a time.monotonic() value
    stop: threading.Event
    on_progress: Callable[[Progress], None] | None = None
    defaults: list[float | None] = dataclasses.field(default_factory=list)
    t0: float = dataclasses.field(default_factory=time.monotonic)  # reset when the search starts
    first_error: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        self.defaults = self.defaults or [None] * n
        self.trials = [0] * n
        self.build_ok, self.build_err, self.run_ok, self.run_err = ([0] * n for _ in range(4))
        # Best time after each batch, for the gradient; a task with records starts with one entry.
        self.history: list[list[float]] = [[b] if b is not None else [] for b in self.best]
        self.picks = [0] * n
        self.done = [False] * n
        self.exhausted = [False] * n  # the search found no new candidate for it
        self.rng = random.Random(0)

    # -- stop conditions
    def should_stop(self) -> bool:
        if self.reason is None:
            if self.stop.is_set():
                self.reason = "interrupted"
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self.reason = "time"
            elif sum(self.trials) >= min(_FAIL_FAST_TRIALS, self.budget):
                self.reason = self.failure()
        return self.reason is not None

    def failure(self) -> str | None:
        """"no-builds" or "no-runs" when trials were made and none of them built, or ran."""
        if not sum(self.trials):
            return None
        if not sum(self.build_ok):
            return "no-builds"
        if not sum(self.run_ok):
            return "no-runs"
        return None

    def at_cap(self, i: int) -> bool:
        return self.exhausted[i] or (self.cap is not None and self.existing[i] + self.trials[i] >= self.cap)

    # -- choosing the next task: MetaSchedule's gradient rule (alpha 0.2, window 3)
    def pick(self, free: list[int]) -> int:
        fresh = [i for i in free if self.picks[i] == 0 and not self.history[i]]
        if fresh:
            choice = fresh[0]
        else:
            alpha, w = 0.2, 3
            grads = []
            for i in free:
                h = self.history[i]
                n = len(h)
                if n and h[-1] < 1e9:
                    g1 = (h[-1 - w] - h[-1]) / w if n >= 1 + w else 0.0
                    g2 = h[-1] / n
                    grads.append((alpha * g1 + (1 - alpha) * g2) * self.weights[i])
                else:
                    grads.append(-1e9)
            if max(grads) == min(grads):
                choice = self.rng.choice(free)
            else:
                choice = free[grads.index(max(grads))]
        self.picks[choice] += 1
        return choice

    # -- results of one measured batch (already committed to the database)
    def record(self, i: int, builder_results, runner_results) -> None:
        if not len(builder_results):
            self.exhausted[i] = True  # its search space is used up; choosing it again only costs time
        times = []
        for b, r in zip(builder_results, runner_results):
            self.trials[i] += 1
            if b.error_msg is not None:
                self.build_err[i] += 1
                self.first_error = self.first_error or f"build: {b.error_msg}"
                continue
            self.build_ok[i] += 1
            if r.error_msg is not None or not r.run_secs:
                self.run_err[i] += 1
                self.first_error = self.first_error or f"run: {r.error_msg}"
                continue
            ms_ = build.median_ms(r.run_secs)
            if ms_ >= _FAILED_SECS * 1e3:
                self.run_err[i] += 1
                continue
            self.run_ok[i] += 1
            times.append(ms_)
        if times:
            self.best[i] = min([*times, *([self.best[i]] if self.best[i] is not None else [])])
        if self.best[i] is not None:
            self.history[i].append(self.best[i])
        self.progress("tuning", self.names[i])

    def model_ms(self, use_tuned: bool) -> float | None:
        """Sum of weight × kernel time: default schedules, or the faster of default and tuned."""
        total = 0.0
        for i, w in enumerate(self.weights):
            vals = [v for v in (self.defaults[i], self.best[i] if use_tuned else None) if v is not None]
            if not vals:
                return None
            total += w * min(vals)
        return total

    def progress(self, phase: str, task: str = "") -> None:
        if self.on_progress is None:
            return
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        self.on_progress(
            Progress(
                phase=phase,
                tasks=len(self.names),
                tasks_done=sum(self.done),
                trials=sum(self.trials),
                budget=self.budget,
                elapsed=time.monotonic() - self.t0,
                deadline=left,
                best_ms=self.model_ms(True),
                default_ms=self.model_ms(False),
                task=task,
            )
        )


def _make_scheduler(run: _Run):
    """MetaSchedule's gradient task choice, but committing every finished batch before the next.

    MetaSchedule's GradientBased scheduler joins no result until every task had its first
    round, so a run killed during the first (longest) round loses everything it measured.
    Here finished batches are joined (which commits them to the database) before the next
    task is chosen, and the run stops cleanly on a signal or the time limit.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class CommitEarlyScheduler(PyTaskScheduler):
        def next_task_id(self) -> int:
            sched = self._outer()
            tasks = sched.tasks_
            for i in range(len(tasks)):
                sched.touch_task(i)
            while True:
                for i, t in enumerate(tasks):
                    run.done[i] = bool(t.is_terminated) or run.at_cap(i)
                if run.should_stop():
                    return -1
                alive = [i for i, t in enumerate(tasks) if not t.is_terminated]
                busy = [i for i in alive if tasks[i].runner_futures is not None]
                free = [i for i in alive if i not in busy and not run.at_cap(i)]
                if free:
                    return run.pick(free)
                if not busy:
                    return -1
                sched.join_running_task(busy[0])  # wait for a device to report

    return CommitEarlyScheduler()


def _make_callback(run: _Run):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Record(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            run.record(int(task_id), builder_results, runner_results)

    return Record()


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGINT/SIGTERM finish the batch in flight and save it; a second SIGINT aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after the batch being measured (Ctrl-C again to abort now)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _quiet_metaschedule(log_dir: Path):
    """MetaSchedule logs every trial to stdout; send that to files in ``log_dir`` only."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    level = ms_log.level
    ms_log.setLevel(logging.WARNING)  # its console handler takes this level; files get DEBUG
    try:
        yield
    finally:
        # Close the log files (a later run in this process deletes the directory).
        for name in [ms_log.name, *logging.root.manager.loggerDict]:
            if name.startswith(ms_log.name):
                lg = logging.getLogger(name)
                for h in list(lg.handlers):
                    if isinstance(h, logging.FileHandler):
                        h.close()
                        lg.removeHandler(h)
        ms_log.setLevel(level)


# --------------------------------------------------------------------------------------------
# the tuning run
# --------------------------------------------------------------------------------------------


def _check(opts: TuneOptions) -> None:
    if opts.trials is not None and opts.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {opts.trials}")
    if opts.trials_per_task is not None and opts.trials_per_task < 1:
        raise UsageError(f"--trials-per-task must be at least 1, got {opts.trials_per_task}")
    if opts.max_minutes is not None and opts.max_minutes <= 0:
        raise UsageError(f"--max-minutes must be positive, got {opts.max_minutes}")
    if opts.num_cores is not None and opts.num_cores < 1:
        raise UsageError(f"--num-cores must be at least 1, got {opts.num_cores}")
    if bool(opts.rpc_tracker) != bool(opts.rpc_key):
        raise UsageError("--rpc-tracker and --rpc-key go together: give both to tune on a device, or neither")
    if opts.rpc_tracker:
        _parse_tracker(opts.rpc_tracker)


def _check_runs_here(opts: TuneOptions, profile: TargetProfile) -> None:
    """The backend can tune, and its kernels can be measured here (a GPU for CUDA; this CPU's
    architecture — emulated times mean nothing) unless an RPC tracker measures them."""
    backends.for_profile(profile).check_tunable(profile, remote=bool(opts.rpc_tracker))


def _measured(db, mods) -> tuple[list[int], list[float | None]]:
    """Per task: measured records in the database (failed trials not counted), and the time (ms)
    of the record a build applies (MetaSchedule's best valid one; None when there is none)."""
    ids = [db.commit_workload(mod) if db.has_workload(mod) else None for mod in mods]
    counts = [0] * len(mods)
    best: list[float | None] = [None] * len(mods)
    if not any(w is not None for w in ids):
        return counts, best
    for rec in db.get_all_tuning_records():
        for i, wl in enumerate(ids):
            if wl is not None and rec.workload.same_as(wl):
                secs = [float(s) for s in (rec.run_secs or [])]
                if secs and max(secs) < _FAILED_SECS:
                    counts[i] += 1
                break
    for i, wl in enumerate(ids):
        if wl is not None:
            top = db.get_top_k(wl, 1)
            if top:
                best[i] = build.median_ms(top[0].run_secs)
    return counts, best


def tune_model(opts: TuneOptions, on_progress: Callable[[Progress], None] | None = None) -> TuneReport:
    """Tune a model's kernels for a target into ``opts.logs/<target>/``; returns what was done.

    Records are committed to MetaSchedule's JSON database as each batch is measured, so a
    killed run keeps them, and a rerun counts them against ``opts.trials``. SIGINT or
    SIGTERM stops after the batch in flight and raises TuningInterrupted; raises
    RuntimeFailure when no candidate builds or runs.
    """
    _check(opts)
    t_start = time.monotonic()
    profile = resolve(opts.target)
    _check_runs_here(opts, profile)
    backend = backends.for_profile(profile)
    imported = backend.prepare(importer.load(opts.model, list(opts.inputs)), profile)
    backend.check_supported(imported, profile)  # every node must run on the device to be tuned
    fused = backend.fuse(importer.to_relax(imported), profile)

    d = tuning_log.target_dir(opts.logs, profile)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the tuning log directory {d}: {e.strerror or e}") from e
    with tuning_log.locked(d):
        meta = tuning_log.read_meta(d)
        problem = tuning_log.mismatch(meta, profile, d)
        if problem:
            raise UsageError(f"{problem}; tune into another --logs DIR, or move {d} away")
        if meta is None:
            meta = {"schema": tuning_log.META_SCHEMA, "profile": profile.name, "target": tuning_log.profile_target(profile),
                    **tuning_log.versions(), "created": _now(), "runs": []}  # fmt: skip
            tuning_log.write_meta(d, meta)
        tuning_log.repair(d)
        return _tune_locked(opts, profile, imported, fused, d, meta, on_progress, t_start)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _tune_locked(opts, profile, imported, fused, d: Path, meta, on_progress, t_start) -> TuneReport:
    import psutil  # MetaSchedule needs it (and cloudpickle, for its popen workers)
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    if opts.rpc_tracker:
        cores = opts.num_cores or _remote_cores(opts)
    else:
        cores = opts.num_cores or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    target = _tuning_target(profile, cores)
    extracted = [t for t in ms.relax_integration.extract_tasks(fused, target) if not _scheduled(t)]
    db = tuning_log.json_database(d, allow_missing=True)
    mods = [t.dispatched[0] for t in extracted]
    existing, best_db = _measured(db, mods)
    n = len(extracted)
    budget_total = opts.trials if opts.trials is not None else DEFAULT_TRIALS_PER_TASK * n
    cap = opts.trials_per_task
    have = sum(min(e, cap) if cap else e for e in existing)
    budget = max(0, budget_total - have)
    log.info(
        "%s: %d kernels to tune for %s (num-cores %d); the database has %d measured trials of them, "
        "budget %d, so %d to measure",
        imported.name, n, profile.name, cores, have, budget_total, budget,
    )  # fmt: skip

    scratch = Path(tempfile.mkdtemp(prefix="tvm-hybrid-tune-"))
    stop = threading.Event()
    evaluator = _evaluator(ms, profile)
    try:
        builder = _make_builder(scratch, profile)
        runner, runner_name = _make_runner(opts, evaluator)
        deadline = time.monotonic() + 60 * opts.max_minutes if opts.max_minutes else None
        names = [t.task_name for t in extracted]
        run = _Run(names=names, weights=[int(t.weight) for t in extracted], existing=existing, best=list(best_db),
                   budget=budget, cap=cap, deadline=deadline, stop=stop, on_progress=on_progress)  # fmt: skip
        with _stop_on_signals(stop):
            if n and budget > 0:
                run.progress("baseline")
                run.defaults = _measure_defaults(extracted, builder, runner, target, profile)
            elif n:  # nothing to measure: the default times from when these kernels were tuned
                known = tuning_log.read_defaults(d)
                run.defaults = [known.get(tvm_ffi.structural_hash(m)) for m in mods]
            if budget > 0 and n and not stop.is_set():
                _search(opts, extracted, target, d, db, builder, runner, run, cap, budget, cores)
        reason = run.reason or run.failure() or ("nothing-to-do" if budget == 0 else "budget")
        if reason == "budget" and sum(run.trials) < budget:
            reason = "exhausted"  # every task's search space ran dry (or reached its cap)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    tuning_log.write_defaults(d, extracted, run.defaults)
    verdicts = {}
    if (opts.check_in_model and not opts.rpc_tracker and backends.for_profile(profile).cpu
            and reason not in ("no-builds", "no-runs", "interrupted")):  # fmt: skip
        run.progress("in-model check")
        try:
            verdicts = check_in_model(imported, profile, d)
        except (HybridError, OSError, RuntimeError) as e:  # the records are saved; builds compare alone-times
            log.warning("in-model check failed (%s); builds compare tuned kernels with their defaults alone",
                        one_line(e, empty="no error message"))  # fmt: skip
    counts, best_now = _measured(db, mods)
    keys = [tvm_ffi.structural_hash(m) for m in mods]
    tasks = [
        TaskReport(
            name=names[i], weight=run.weights[i], flops=_flops(mods[i]), default_ms=run.defaults[i], tuned_ms=best_now[i],
            trials=run.trials[i], records=counts[i], build_errors=run.build_err[i], run_errors=run.run_err[i],
            in_model=verdicts[keys[i]][:2] if keys[i] in verdicts else None,
        )
        for i in range(n)
    ]  # fmt: skip
    report = TuneReport(
        target=profile.name, database=d, tasks=tasks, trials=sum(run.trials), budget=budget,
        seconds=time.monotonic() - t_start, stopped=reason, runner=runner_name, first_error=run.first_error,
        in_model_checked=len(verdicts), in_model_slower=sum(v[1] >= v[0] for v in verdicts.values()),
    )  # fmt: skip
    meta["runs"].append(
        {"finished": _now(), "model": imported.name, "model_sha256": imported.sha256, "trials": report.trials,
         "stopped": reason, "runner": runner_name, "num_cores": cores,
         **({"cpu": hostcpu.cpu_model()} if not opts.rpc_tracker and hostcpu.cpu_model() else {}),
         "cache_flush": evaluator.enable_cpu_cache_flush, **tuning_log.versions()}  # fmt: skip
    )
    tuning_log.write_meta(d, meta)
    run.progress("done")
    if reason in ("no-builds", "no-runs"):
        what = "built" if reason == "no-builds" else "ran"
        raise RuntimeFailure(
            f"tuning measured nothing: none of the first {report.trials} candidates {what} "
            f"({one_line(run.first_error, empty='no error message')}); MetaSchedule's logs are in {d / 'logs'}"
        )
    if reason == "interrupted":
        raise TuningInterrupted(
            f"interrupted after {report.trials} trials; every measured record is saved in {d}; "
            "rerun the same command to continue",
            report,
        )
    return report


def check_in_model(imported, profile: TargetProfile, d: Path, rounds: int = 20) -> dict[int, tuple[float, float, float]]:
    """Time each tuned kernel in place, in the whole model, against its default schedule.

    A kernel timed alone (MetaSchedule's measurement, caches flushed or not) is not the
    kernel in the model, where its neighbours decide what is in cache and the thread pool
    has just run another kernel: on PP-OCR det and cls (x86-64-avx2) tuned records that won
    alone lost in place. Builds the model with and without the log, runs the two in
    interleaved rounds with each kernel call timed, and records per kernel (default ms,
    tuned ms, the record's ms) in ``defaults.json``; builds then keep the default where the
    record was slower in place. Returns those verdicts, keyed by workload hash.
    """
    import numpy as np
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    logs = tuning_log.open_database(d.parent, profile)
    if logs is None or tuning_log.target_dir(d.parent, profile) != d:
        return {}
    logs.in_model, logs.in_model_cpu = {}, {}  # judge every record afresh, here
    backend = backends.for_profile(profile)
    fused = backend.fuse(importer.to_relax(imported), profile)
    tuned_mod = backend.schedule(build.apply_database(fused, profile, logs), profile)
    tuned = [
        gv.name_hint for gv, f in tuned_mod.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and build.TUNED_ATTR in f.attrs
    ]  # fmt: skip
    if not tuned:
        return {}
    default_mod = backend.schedule(fused, profile)
    rng = np.random.default_rng(0)
    feeds = [
        rng.uniform(0, 1, s.shape).astype(s.dtype) if np.dtype(s.dtype).kind == "f" else np.zeros(s.shape, s.dtype)
        for s in imported.inputs
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-check-") as tmp:
        vms = []
        for name, m in (("default", default_mod), ("tuned", tuned_mod)):
            lib = backend.build_library(m, profile, Path(tmp) / f"{name}.so").library
            vms.append(relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu()))
        args = [tvm.runtime.tensor(a, tvm.cpu()) for a in feeds]
        per = [{}, {}]
        for r in range(rounds + 1):
            for vm, acc in zip(vms, per):
                times = _kernel_times(vm, args)
                if r:  # the first round warms up
                    for k, t in times.items():
                        acc.setdefault(k, []).append(t)
    target = profile.tvm()
    data = {str(k): v for k, v in tuning_log.read_defaults_file(d).items()}
    cpu = hostcpu.cpu_model()  # the check runs the target here, natively: its CPU model is this one's
    verdicts = {}
    for name in tuned:
        if name not in per[0] or name not in per[1]:
            continue
        workload = _normalize_mod(fused[name])
        key = tvm_ffi.structural_hash(workload)
        record = logs.database.query_tuning_record(workload, target, name)
        if str(key) not in data or record is None or not record.run_secs:
            continue
        verdict = (statistics.median(per[0][name]), statistics.median(per[1][name]), build.median_ms(record.run_secs))
        verdicts[key] = verdict
        data[str(key)]["in_model"] = {"default_ms": round(verdict[0], 6), "tuned_ms": round(verdict[1], 6),
                                      "record_ms": verdict[2], **({"cpu": cpu} if cpu else {})}  # fmt: skip
    tuning_log.write_defaults_file(d, data)
    slower = sum(v[1] >= v[0] for v in verdicts.values())
    log.info("in-model check: %d of %d tuned kernels slower in place; builds keep their defaults", slower, len(verdicts))
    return verdicts


def _kernel_times(vm, args) -> dict[str, float]:
    """One run of the model with each kernel call timed: ms per kernel name, calls summed."""
    import tvm

    times: dict[str, float] = {}
    start = [0.0]

    def instrument(func, symbol, before, ret, *rest):
        if before:
            start[0] = time.perf_counter()
        else:
            times[symbol] = times.get(symbol, 0.0) + 1e3 * (time.perf_counter() - start[0])
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument))
    try:
        vm["main"](*args)
    finally:
        vm.set_instrument(None)
    return times


def _scheduled(task) -> bool:
    attrs = task.dispatched[0]["main"].attrs
    return attrs is not None and bool(attrs.get("tirx.is_scheduled", False))


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # data-dependent loops: no estimate
        return 0.0


def _search(opts, extracted, target, d: Path, db, builder, runner, run: _Run, cap, budget, cores) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    _import_tensor_intrin()  # TuneContext imports it; faster here
    n = len(extracted)
    run.t0 = time.monotonic()
    per_task = cap if cap else budget
    share = max(1, math.ceil(budget / n))
    per_iter = opts.trials_per_iter or max(2, min(64, share // 2))
    log_dir = d / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # the last run's logs only
    log_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_metaschedule(log_dir):
        loggers = get_loggers_from_work_dir(str(d), [t.task_name for t in extracted])
        contexts = []
        for task, logger, rand_state in zip(extracted, loggers, fork_seed(opts.seed, n=n)):
            contexts.append(
                ms.TuneContext(
                    mod=task.dispatched[0],
                    target=target,
                    space_generator="post-order-apply",
                    search_strategy=ms.search_strategy.EvolutionarySearch(population_size=opts.population),
                    task_name=task.task_name,
                    logger=logger,
                    rand_state=rand_state,
                    num_threads=cores if not opts.rpc_tracker else "physical",
                ).clone()
            )
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _make_callback(run)]
        ms.tune_tasks(
            tasks=contexts,
            task_weights=[float(t.weight) for t in extracted],
            work_dir=str(d),
            max_trials_global=budget,
            max_trials_per_task=per_task,
            num_trials_per_iter=per_iter,
            builder=builder,
            runner=runner,
            database=db,
            cost_model=ms.cost_model.CostModel.create("xgb", num_tuning_cores=min(cores, os.cpu_count() or 1)),
            measure_callbacks=callbacks,
            task_scheduler=_make_scheduler(run),
        )
