"""Threads: the runtime computes on every usable core by default, and the knob sets the count.

Checked through TVM's runtime, in fresh processes with TVM_NUM_THREADS unset: the pool size as
``runtime.NumThreads`` reports it in the thread that ran the model, and the CPU time its worker
threads spent (a pool whose kernels run serially has workers that never wake up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CLS, cli

from tvm_hybrid.errors import UsageError
from tvm_hybrid.runtime import Session
from tvm_hybrid.runtime import threads as th

CLS_SHAPE = {"x": (1, 3, 48, 192)}
CORES = th.usable_cores()
multicore = pytest.mark.skipif(CORES < 2, reason="needs 2 usable cores to tell 1 thread from all")

PROBE = """
import json, os, sys, threading, time
import numpy as np
if {cpu!r} is not None:
    os.sched_setaffinity(0, {{{cpu!r}}})
from tvm_hybrid.runtime import Session, threads

def tasks():
    return set(os.listdir("/proc/self/task"))

def cpu_s(tid):
    with open(f"/proc/self/task/{{tid}}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

before = tasks()
s = Session({art!r}, **{kwargs!r})
x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
s.run({{"x": x}})
workers = tasks() - before
t_end = time.perf_counter() + 1.0
while time.perf_counter() < t_end:
    s.run({{"x": x}})
print(json.dumps({{"threads": s.threads, "trace": s.trace[0].get("threads"), "num_threads": threads.num_threads(),
                  "workers": len(workers), "worker_cpu_s": sum(cpu_s(t) for t in workers),
                  "worker_cores": [len(os.sched_getaffinity(int(t))) for t in workers],
                  "main_cpu_s": cpu_s(str(threading.get_native_id()))}}))
"""


def probe(art: Path, env: dict[str, str] | None = None, cpu: int | None = None, **kwargs) -> dict:
    """Run the classifier for a second in a fresh process; what TVM's runtime says of its threads."""
    clean = {k: v for k, v in os.environ.items() if k not in (th.ENV, "OMP_NUM_THREADS", th.BIND_ENV)}
    code = PROBE.format(art=str(art), kwargs=kwargs, cpu=cpu)
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@multicore
def test_default_session_computes_on_every_usable_core(artifacts):
    """TVM alone would use half the logical CPUs on x86 (one of two here) and, with its cap at 1,
    run every parallel kernel serially."""
    got = probe(artifacts.get(CLS, CLS_SHAPE))
    assert got["threads"] == got["trace"] == got["num_threads"] == CORES, got
    assert got["workers"] == CORES - 1, got  # the calling thread is worker 0
    assert got["worker_cpu_s"] > 0.3 * got["main_cpu_s"], got  # they computed, not just existed


@multicore
def test_threads_knob_and_environment_set_the_pool(artifacts):
    art = artifacts.get(CLS, CLS_SHAPE)
    one = probe(art, threads=1)
    assert one["threads"] == one["trace"] == one["num_threads"] == 1, one
    # A pool of one runs every kernel in the calling thread (its idle worker may still spin a little).
    assert one["worker_cpu_s"] < 0.3 * one["main_cpu_s"], one
    env = probe(art, env={th.ENV: "1"})
    assert env["threads"] == env["trace"] == env["num_threads"] == 1, env
    # An explicit count above the environment's wins (the cap is raised for it).
    two = probe(art, env={th.ENV: "1"}, threads=2)
    assert two["num_threads"] == 2 and two["worker_cpu_s"] > 0.3 * two["main_cpu_s"], two


@multicore
def test_workers_are_not_pinned_unless_asked(artifacts):
    """TVM pins each worker to one core; with another process busy on that core, every parallel
    kernel waited for it a scheduler slice (YOLOv8n-320: 554 ms a call instead of 26). The
    runtime leaves them free to run on any usable core; $TVM_BIND_THREADS=1 pins them as TVM would."""
    art = artifacts.get(CLS, CLS_SHAPE)
    free = probe(art)
    assert free["worker_cores"] and all(n == CORES for n in free["worker_cores"]), free
    pinned = probe(art, env={th.BIND_ENV: "1"})
    assert pinned["worker_cores"] and all(n == 1 for n in pinned["worker_cores"]), pinned


@multicore
def test_cpu_affinity_limits_the_default(artifacts):
    cpu = min(os.sched_getaffinity(0))
    got = probe(artifacts.get(CLS, CLS_SHAPE), cpu=cpu)
    assert got["threads"] == got["num_threads"] == 1, got


def test_cgroup_quota_caps_the_core_count(tmp_path):
    """cgroup v2 (cpu.max in the process's cgroup or an ancestor) and v1 (cfs quota / period)."""
    v2 = tmp_path / "v2"
    (v2 / "kubepods/pod1").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "kubepods/cpu.max").write_text("150000 100000\n")
    (v2 / "kubepods/pod1/cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert th.cgroup_cpu_quota(v2, proc) == 1.5
    (v2 / "kubepods/cpu.max").write_text("max 100000\n")
    assert th.cgroup_cpu_quota(v2, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct/docker/abc").mkdir(parents=True)
    (v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu,cpuacct/docker/abc/cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert th.cgroup_cpu_quota(v1, proc) == 0.5
    (v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert th.cgroup_cpu_quota(v1, proc) is None
    assert th.cgroup_cpu_quota(v1, tmp_path / "missing") is None


def test_bad_thread_counts_are_usage_errors(artifacts, monkeypatch):
    art = artifacts.get(CLS, CLS_SHAPE)
    for bad, msg in ((0, "at least 1"), (-2, "at least 1"), (CORES + 1, f"may use {CORES} core"), ("2", "whole number")):
        with pytest.raises(UsageError, match=msg):
            Session(art, threads=bad)
    monkeypatch.setenv(th.ENV, "lots")
    with pytest.raises(UsageError, match="TVM_NUM_THREADS='lots' is not a positive whole number"):
        Session(art)


def test_run_threads_option_and_json(artifacts, tmp_path):
    art = artifacts.get(CLS, CLS_SHAPE)
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 48, 192), np.float32))
    proc = cli("run", str(art), "--input", f"x={x}", "--threads", "1", "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["threads"] == 1 and doc["trace"][0]["threads"] == 1
    for bad in ("0", "-1", str(CORES + 1)):
        proc = cli("run", str(art), "--input", f"x={x}", "--threads", bad)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: --threads"), proc.stderr
    proc = cli("serve", str(art), "--threads", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("Error: --threads must be at least 1"), proc.stderr


@multicore
def test_server_workers_split_the_cores(artifacts, monkeypatch, split_cls):
    """Each worker thread has its own TVM pool: by default they share the cores."""
    import concurrent.futures

    from tvm_hybrid.server.app import Registry

    monkeypatch.delenv(th.ENV, raising=False)
    reg = Registry([split_cls / "cloud-x86"], workers=CORES)
    try:
        assert reg.threads == 1
        [model] = [m for vs in reg.models.values() for m in vs.values()]
        feeds = {s.name: np.zeros(s.shape, s.dtype) for s in model.inputs}

        def infer(_):
            model.infer(feeds)
            return th.num_threads(), threading.get_ident()

        with concurrent.futures.ThreadPoolExecutor(CORES) as pool:
            seen = list(pool.map(infer, range(8)))
        assert {n for n, _ in seen} == {1}, seen  # TVM's own pools, in the workers' threads
    finally:
        reg.close()
    assert th.per_worker(1, None) == CORES and th.per_worker(CORES, 2) == 2
