"""MetaSchedule tuning with tiny budgets on a tiny model: tune → compile applies the log → same
outputs as onnxruntime (rtol 1e-4, atol 1e-5); resume after SIGINT and SIGKILL; RPC tracker on
loopback; per-target logs. Speed is the benchmark's business, never asserted here."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TARGET, assert_close, reference
from onnx import TensorProto, helper, numpy_helper

RTOL, ATOL = 1e-4, 1e-5
# Small searches: a tiny population makes each round of candidates take a second, not ten.
POPULATION = 32


def tiny_model(path: Path) -> Path:
    """Conv+Relu → Reshape → MatMul: three kernels to tune (conv, reshape, matmul)."""
    rng = np.random.RandomState(0)
    inits = [
        numpy_helper.from_array((rng.randn(8, 3, 3, 3) * 0.2).astype(np.float32), "w"),
        numpy_helper.from_array((rng.randn(8) * 0.1).astype(np.float32), "b"),
        numpy_helper.from_array((rng.randn(8 * 8 * 8, 16) * 0.05).astype(np.float32), "m"),
        numpy_helper.from_array(np.array([1, 8 * 8 * 8], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def hybrid(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvm_hybrid", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)  # fmt: skip


def one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def records(d: Path) -> list:
    """Every line of the records file, parsed: a half-written line fails here."""
    path = d / "database_tuning_record.json"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def measured(d: Path) -> int:
    return sum(1 for r in records(d) if max(r[1][1]) < 1e10)


def run_artifact(path: Path, x: np.ndarray) -> dict:
    from tvm_hybrid.runtime import Session

    with Session(path) as sess:
        return sess.run({"x": x})


def compile_tiny(model: Path, out: Path, logs: Path | None):
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    [summary] = compile_model(CompileOptions(model=model, targets=(TARGET,), output=out, cloud=None, tuning_logs=logs))
    manifest = json.loads((summary.path / "manifest.json").read_text())
    return summary, manifest


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One real tuning run (in this process) into a fresh log: 6 trials over the 2 kernels (its
    flatten is a view, not a kernel)."""
    from tvm_hybrid.compiler.tune import TuneOptions, tune_model

    root = tmp_path_factory.mktemp("tune")
    model = tiny_model(root / "tiny.onnx")
    logs = root / "logs"
    report = tune_model(TuneOptions(model=model, target=TARGET, trials=6, logs=logs, population=POPULATION, seed=0))
    return model, logs, report


def test_tune_measures_real_records_with_meta(tuned):
    model, logs, report = tuned
    d = logs / TARGET
    assert report.database == d and report.stopped == "budget"
    assert [t.name for t in report.tasks] == ["matmul", "fused_conv2d_add_relu"]
    assert report.trials >= 6 and report.tasks[0].build_errors == 0
    # Measured for real: finite run times, no "Build errors" stand-ins (1e10).
    times = [s for r in records(d) for s in r[1][1]]
    assert times and all(math.isfinite(s) and 0 < s < 1e10 for s in times)
    assert measured(d) == sum(t.records for t in report.tasks) >= 6
    assert all(t.default_ms is not None and t.default_ms > 0 for t in report.tasks)
    meta = json.loads((d / "meta.json").read_text())
    import tvm
    import tvm_ffi

    assert meta["tvm"] == tvm.__version__ and meta["tvm_ffi"] == tvm_ffi.__version__
    assert meta["target"] == {"target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, "host": None}
    assert meta["runs"][-1]["trials"] == report.trials and meta["runs"][-1]["model"] == "tiny"
    assert set(json.loads((d / "defaults.json").read_text())) and not (d / ".lock").read_text()


def test_compile_applies_the_log_and_matches_onnxruntime(tuned, tmp_path):
    model, logs, report = tuned
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = reference(model, {"x": x})
    # Without the default-schedule times every record is applied: all three kernels tuned.
    bare = tmp_path / "logs"
    shutil.copytree(logs, bare)
    (bare / TARGET / "defaults.json").unlink()
    summary, manifest = compile_tiny(model, tmp_path / "tuned", bare)
    kernels = manifest["segments"][0]["kernels"]
    assert kernels["tuned"] > 0 and summary.kernels == kernels
    assert kernels["tuned"] == sum(t.tuned_ms is not None for t in report.tasks)
    assert_close(run_artifact(summary.path, x), want, RTOL, ATOL)
    # With them, a tuned kernel is applied only where it beat the default when measured.
    summary, manifest = compile_tiny(model, tmp_path / "guarded", logs)
    faster = sum(t.tuned_ms is not None and t.applied_ms == t.tuned_ms for t in report.tasks)
    assert manifest["segments"][0]["kernels"]["tuned"] == faster
    assert_close(run_artifact(summary.path, x), want, RTOL, ATOL)


def test_tuned_kernels_are_checked_in_place_and_losers_keep_their_defaults(tuned):
    """Tuning ends by timing each applied record in the model against its default; a build
    keeps the default where the record was slower in place, and a verdict on one record does
    not hold for another (a faster one found later)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from tvm_hybrid.compiler import backends, build, importer, tuning_log
    from tvm_hybrid.targets import resolve

    model, logs, report = tuned
    checked = [t for t in report.tasks if t.in_model is not None]
    assert report.in_model_checked == len(checked) and report.in_model_slower <= len(checked)
    assert all(t.in_model[0] > 0 and t.in_model[1] > 0 for t in checked)
    defaults = json.loads((logs / TARGET / "defaults.json").read_text())
    assert sum("in_model" in v for v in defaults.values()) == len(checked)

    # The verdicts, forged for every kernel's best record, without the defaults' alone-times.
    profile = resolve(TARGET)
    fused = backends.for_profile(profile).fuse(importer.to_relax(importer.load(model, [])), profile)
    log = tuning_log.open_database(logs, profile)
    log.default_ms = {}
    records = {}
    for gv, f in fused.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            workload = _normalize_mod(f)
            rec = log.database.query_tuning_record(workload, profile.tvm(), gv.name_hint)
            if rec is not None:
                records[tvm_ffi.structural_hash(workload)] = build.median_ms(rec.run_secs)
    assert records, "the tiny model's kernels have records"

    def tuned_kernels(verdicts) -> int:
        log.in_model = verdicts
        return build.kernel_counts(build.apply_database(fused, profile, log))[0]

    assert tuned_kernels({}) == len(records)
    assert tuned_kernels({k: (1.0, 2.0, ms) for k, ms in records.items()}) == 0  # slower in place
    assert tuned_kernels({k: (2.0, 1.0, ms) for k, ms in records.items()}) == len(records)  # faster there
    assert tuned_kernels({k: (1.0, 2.0, ms + 1.0) for k, ms in records.items()}) == len(records)  # another record
    # A verdict taken on another CPU model does not hold here: not applied until checked here.
    faster = {k: (2.0, 1.0, ms) for k, ms in records.items()}
    log.local_cpu = "This CPU"
    log.in_model_cpu = {k: "Another CPU" for k in records}
    assert tuned_kernels(faster) == 0
    log.in_model_cpu = {k: "This CPU" for k in records}
    assert tuned_kernels(faster) == len(records)
    log.local_cpu = ""  # a cross build (or an unknown CPU): the verdict stands
    log.in_model_cpu = {k: "Another CPU" for k in records}
    assert tuned_kernels(faster) == len(records)
    # The check records the CPU model it ran on, and the tuning run records it in meta.json.
    from tvm_hybrid import hostcpu

    if hostcpu.cpu_model():
        assert all(v["in_model"].get("cpu") == hostcpu.cpu_model() for v in defaults.values() if "in_model" in v)
        meta = json.loads((logs / TARGET / "meta.json").read_text())
        assert meta["runs"][-1]["cpu"] == hostcpu.cpu_model()


def test_compile_without_logs_uses_default_schedules(tuned, tmp_path):
    model, logs, _ = tuned
    x = np.ones((1, 3, 8, 8), np.float32)
    summary, manifest = compile_tiny(model, tmp_path / "plain", None)
    assert manifest["segments"][0]["kernels"] == {"tuned": 0, "default": 2}
    assert_close(run_artifact(summary.path, x), reference(model, {"x": x}), RTOL, ATOL)
    proc = hybrid("compile", str(model), "-t", TARGET, "-o", str(tmp_path / "cli"), "--no-tuning-logs", "--json")
    assert proc.returncode == 0, proc.stderr
    [art] = json.loads(proc.stdout)["artifacts"]
    assert art["kernels"] == {"tuned": 0, "default": 2}
    err = one_line_error(hybrid("compile", str(model), "-t", TARGET, "-o", str(tmp_path / "x"),
                                "--tuning-logs", str(tmp_path / "nowhere")), 2)  # fmt: skip
    assert "--tuning-logs" in err


def test_a_log_for_another_target_is_not_applied_nor_tuned_into(tuned, tmp_path):
    model, logs, _ = tuned
    # The same files under another profile's name: its recorded TVM target differs.
    shutil.copytree(logs / TARGET, tmp_path / "x86-64")
    from tvm_hybrid.compiler.tuning_log import open_database
    from tvm_hybrid.targets import resolve

    assert open_database(tmp_path, resolve("x86-64")) is None
    assert open_database(logs, resolve(TARGET)) is not None
    err = one_line_error(hybrid("tune", str(model), "-t", "x86-64", "--trials", "1", "--logs", str(tmp_path)), 2)
    assert "was tuned for TVM target" in err and "mcpu" in err
    # A log from another TVM minor version is refused the same way.
    meta = json.loads((logs / TARGET / "meta.json").read_text())
    other = tmp_path / "old"
    shutil.copytree(logs / TARGET, other / TARGET)
    (other / TARGET / "meta.json").write_text(json.dumps({**meta, "tvm": "0.26.0"}))
    assert open_database(other, resolve(TARGET)) is None
    err = one_line_error(hybrid("tune", str(model), "-t", TARGET, "--trials", "1", "--logs", str(other)), 2)
    assert "TVM 0.26.0" in err


def test_half_written_record_is_read_around_then_cut_and_kept(tuned, tmp_path):
    from tvm_hybrid.compiler.tune import TuneOptions, tune_model
    from tvm_hybrid.compiler.tuning_log import open_database
    from tvm_hybrid.targets import resolve

    model, logs, _ = tuned
    shutil.copytree(logs, tmp_path / "logs")
    d = tmp_path / "logs" / TARGET
    before = measured(d)
    with open(d / "database_tuning_record.json", "a") as f:
        f.write('[0, [[[], []], [1.0e-0')  # what a kill in the middle of a write leaves
    assert len(open_database(tmp_path / "logs", resolve(TARGET)).database) == len(records(logs / TARGET))
    # A run with nothing left to measure still repairs the file it will append to.
    report = tune_model(TuneOptions(model=model, target=TARGET, trials=1, logs=tmp_path / "logs", population=POPULATION))
    assert report.stopped == "nothing-to-do" and report.trials == 0
    assert measured(d) == before
    [kept] = d.glob("database_tuning_record.json.partial-*")
    assert kept.read_text() == '[0, [[[], []], [1.0e-0'


def test_interrupted_tune_loses_no_record_and_resumes(tmp_path):
    model = tiny_model(tmp_path / "tiny.onnx")
    logs = tmp_path / "logs"
    d = logs / TARGET
    args = [sys.executable, "-m", "tvm_hybrid", "tune", str(model), "-t", TARGET, "--trials", "10",
            "--population", str(POPULATION), "--logs", str(logs), "--seed", "1"]  # fmt: skip
    seen = 0
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while measured(d) <= seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        now = measured(d)  # every line parses: nothing half-written
        assert now > seen, (sig, err)
        if sig == signal.SIGINT and proc.returncode != 0:
            lines = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
            assert proc.returncode == 130 and "rerun the same command to continue" in lines[-1], err
        seen = now
    proc = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # The rerun measures only what the budget has left after the records already there.
    assert report["budget"] == max(0, 10 - seen) and measured(d) >= seen
    assert measured(d) >= 10 or report["stopped"] == "exhausted"
    assert sum(t["records"] for t in report["tasks"]) == measured(d)
    # Run again: the budget is spent, nothing more is measured.
    again = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600).stdout)
    assert again["trials"] == 0 and again["stopped"] == "nothing-to-do"


def test_tune_on_a_device_through_an_rpc_tracker(tmp_path):
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    from tvm_hybrid.compiler.tune import TuneOptions, tune_model

    model = tiny_model(tmp_path / "tiny.onnx")
    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    server = rpc.Server(host="127.0.0.1", port=9300, port_end=9400, key="tvm-hybrid-test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)  # fmt: skip
    try:
        report = tune_model(TuneOptions(model=model, target=TARGET, trials=2, logs=tmp_path / "logs",
                                        population=POPULATION, rpc_tracker=f"127.0.0.1:{tracker.port}",
                                        rpc_key="tvm-hybrid-test"))  # fmt: skip
    finally:
        server.terminate()
        tracker.terminate()
    assert report.runner == f"rpc://127.0.0.1:{tracker.port}/tvm-hybrid-test"
    assert report.trials >= 2 and measured(tmp_path / "logs" / TARGET) >= 2
    times = [s for r in records(tmp_path / "logs" / TARGET) for s in r[1][1]]
    assert all(math.isfinite(s) and 0 < s < 1e10 for s in times)
    # A key no server registered: one line, exit 5, before any tuning.
    err = one_line_error(hybrid("tune", str(model), "-t", TARGET, "--logs", str(tmp_path / "l2"),
                                "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "nobody"), 5)  # fmt: skip
    assert "RPC tracker" in err


def test_no_candidate_builds_fails_loudly(tmp_path):
    # A real profile whose linker always fails: every candidate comes back "Build errors".
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (Path(__file__).resolve().parents[1] / "targets" / f"{TARGET}.toml").read_text()
    text = text.replace(f'name = "{TARGET}"', 'name = "x86-64-broken-cc"').replace('cc = ""', 'cc = "false"')
    (profiles / "broken.toml").write_text(text)
    model = tiny_model(tmp_path / "tiny.onnx")
    proc = hybrid("tune", str(model), "-t", "x86-64-broken-cc", "--trials", "4", "--population", str(POPULATION),
                  "--logs", str(tmp_path / "logs"), env={"TVM_HYBRID_TARGETS_PATH": str(profiles)})  # fmt: skip
    err = one_line_error(proc, 5)
    assert "tuning measured nothing" in err and "built" in err


def test_one_tuning_run_per_database(tmp_path):
    from tvm_hybrid.compiler import tuning_log

    model = tiny_model(tmp_path / "tiny.onnx")
    d = tmp_path / "logs" / TARGET
    d.mkdir(parents=True)
    with tuning_log.locked(d):
        err = one_line_error(hybrid("tune", str(model), "-t", TARGET, "--logs", str(tmp_path / "logs")), 2)
    assert f"being tuned by another process (pid {os.getpid()})" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--trials", "0"], "--trials"),
        (["--rpc-key", "k"], "--rpc-tracker and --rpc-key"),
        (["--rpc-tracker", "nohostport", "--rpc-key", "k"], "HOST:PORT"),
    ],
)
def test_bad_tune_options_exit_2(tmp_path, args, needle):
    model = tiny_model(tmp_path / "tiny.onnx")
    assert needle in one_line_error(hybrid("tune", str(model), "-t", TARGET, "--logs", str(tmp_path), *args), 2)


def test_a_target_of_another_architecture_needs_an_rpc_device(tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (Path(__file__).resolve().parents[1] / "targets" / f"{TARGET}.toml").read_text()
    text = text.replace(f'name = "{TARGET}"', 'name = "arm64-test"').replace("x86_64-linux-gnu", "aarch64-linux-gnu")
    (profiles / "arm.toml").write_text(text.replace('mcpu = "haswell"', 'mcpu = "cortex-a76"'))
    proc = hybrid("tune", str(tiny_model(tmp_path / "tiny.onnx")), "-t", "arm64-test", "--logs", str(tmp_path),
                  env={"TVM_HYBRID_TARGETS_PATH": str(profiles)})  # fmt: skip
    assert "--rpc-tracker HOST:PORT --rpc-key KEY" in one_line_error(proc, 2)
