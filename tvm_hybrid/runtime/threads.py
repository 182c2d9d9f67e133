"""How many threads TVM's runtime computes with: every core this process may use, unless told.

TVM's thread pool is per calling thread, created on that thread's first parallel kernel with
``MaxConcurrency()`` workers at most: ``$TVM_NUM_THREADS`` (or ``$OMP_NUM_THREADS``) if set, else
*half* the machine's logical CPUs on x86 (it assumes hyper-threading) — one core of two on a
2-core VM, whatever the CPU affinity or cgroup quota says. ``runtime.config_threadpool`` can set a
pool's worker count afterwards, but never above that cap.

TVM also reads that cap again on every parallel launch, and runs the kernel serially when it is 1.

So the runtime configures the pool itself, in the thread that runs the model, on its first call
there (``use(n)``): it makes sure ``$TVM_NUM_THREADS`` is set, to at least ``n`` (unset, it
becomes the usable core count, the cap TVM's default should have had), then sets the pool to
``n`` workers. The count comes from ``resolve``: an explicit ``threads=`` first, then
``$TVM_NUM_THREADS`` (honoured as TVM would), then the cores this process may run on — its CPU
affinity, capped by a cgroup CPU quota, as onnxruntime counts them.

TVM also pins each worker to one core. Where another process keeps a core busy, the worker pinned
there waits a whole scheduler slice for it at every parallel kernel, and the others spin at the
barrier. On 2 Zen 4 cores with a busy loop on one (``scripts/bench.py --busy-cores 1 --model
zoo:yolov8n-320 --model minilm-l3``), pinned (``TVM_BIND_THREADS=1``): YOLOv8n-320 554 ms a
call against onnxruntime's 28.9, MiniLM-L3 191 against 16.5; unpinned: 26.0 against 30.5 and
15.6 against 21.4. Idle, the two differed by less than this shared machine's noise (one run
each, pinned then unpinned: YOLOv8n-320 1.10x and 1.05x onnxruntime, MiniLM-L3 1.04x and 0.97x,
onnxruntime itself moving by 40% between them). So the runtime leaves the workers unpinned
(``$TVM_BIND_THREADS=0``) unless ``$TVM_BIND_THREADS`` is set.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

from ..errors import UsageError
from ._tvm import tvm_runtime

log = logging.getLogger(__name__)

ENV = "TVM_NUM_THREADS"
BIND_ENV = "TVM_BIND_THREADS"  # TVM reads it whenever a pool sets its workers' affinity
_BIG_CORES = 1  # threading::ThreadGroup::kBig, the mode TVM's pool starts in
_lock = threading.Lock()
_local = threading.local()  # .requested, .actual, .cap: what use() last asked of this thread's pool, got, and left in the env
_warned: set[tuple[int, int]] = set()


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time the cgroups this process is in allow it (the tightest of them), or None.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") in this process's cgroup and every
    ancestor; cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no quota).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        rel = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            for d in _ancestors(root / rel, root):
                quotas.append(_read_v2(d / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for d in _ancestors(mount / rel, mount):
                        quotas.append(_read_v1(d))
                    break
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _ancestors(d: Path, stop: Path):
    while True:
        yield d
        if d == stop or stop not in d.parents:
            return
        d = d.parent


def _read_v2(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _read_v1(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def resolve(threads: int | None, what: str = "threads") -> int:
    """The thread count to run with: ``threads`` if given (1 … usable cores), else a set
    ``$TVM_NUM_THREADS``, else every usable core. Bad values raise UsageError."""
    cores = usable_cores()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise UsageError(f"{what} must be a whole number of threads, not {threads!r}")
        if threads < 1:
            raise UsageError(f"{what} must be at least 1, got {threads}")
        if threads > cores:
            raise UsageError(
                f"{what} is {threads}, but this process may use {cores} core{'s' if cores > 1 else ''} "
                "(CPU affinity and cgroup quota); ask for at most that many"
            )
        return threads
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"{ENV}={env!r} is not a positive whole number; unset it or set it to 1…{cores}")
        return n
    return cores


def per_worker(workers: int, threads: int | None, what: str = "threads") -> int:
    """Threads for each of ``workers`` threads computing at once (a server's): ``threads`` if
    given, a set ``$TVM_NUM_THREADS`` as it is, else the usable cores split between the workers,
    so that their pools do not oversubscribe the cores."""
    if threads is not None or os.environ.get(ENV, "").strip():
        return resolve(threads, what)
    return max(1, usable_cores() // max(1, workers))


def use(n: int) -> int:
    """Make TVM's thread pool in the calling thread run ``n`` workers; returns the count it runs.

    Cheap after the first call in a thread (a thread-local compare), unless $TVM_NUM_THREADS
    changed since (then the cap is checked again)."""
    if getattr(_local, "requested", None) == n and os.environ.get(ENV) == _local.cap:
        return _local.actual
    tvm = tvm_runtime()
    config = tvm.get_global_func("runtime.config_threadpool")
    with _lock:
        # TVM reads the cap from the environment when this thread's pool is created (by the call
        # below, unless a parallel kernel ran in this thread before) and again on every parallel
        # launch, running the kernel serially when it is 1: so it stays set, at least ``n``.
        os.environ.setdefault(BIND_ENV, "0")  # unpinned workers: see the module's docstring
        cap = os.environ.get(ENV, "").strip()
        if not cap.isdigit() or int(cap) < n:
            os.environ[ENV] = str(max(n, usable_cores() if not cap else 0))
        config(_BIG_CORES, n)
        cap = os.environ.get(ENV)
    got = num_threads()
    _local.requested, _local.actual, _local.cap = n, got, cap
    if got != n and (got, n) not in _warned:
        _warned.add((got, n))
        log.warning(
            "TVM's thread pool in thread %r runs %d thread(s), not %d: it was created before the "
            "runtime configured it (by TVM code that ran in this thread first, with %s=%s); run the "
            "Session in another thread, or set %s=%d before the process starts",
            threading.current_thread().name, got, n, ENV, os.environ.get(ENV, "unset"), ENV, n,
        )  # fmt: skip
    return got


def num_threads() -> int:
    """Workers in the calling thread's TVM thread pool, as TVM's runtime reports them."""
    return int(tvm_runtime().get_global_func("runtime.NumThreads")())
