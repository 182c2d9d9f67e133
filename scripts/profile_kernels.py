"""Per-kernel and end-to-end timing of a model compiled by tvm_hybrid, next to onnxruntime.

Examples::

    python scripts/profile_kernels.py tests/models/ch_PP-OCRv4_det_infer.onnx --input x:1x3x320x320
    python scripts/profile_kernels.py tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx --input x:1x3x48x192
    python scripts/profile_kernels.py zoo:resnet_block --no-default   # TVM's unscheduled lowering
    python scripts/profile_kernels.py MODEL --input x:1x3x320x320 --tuned --target x86-64-avx2

TVM and onnxruntime runs are interleaved (a short block of each per round) and medians
reported, so a machine shared with other jobs slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _load(spec: str, overrides: list[str]):
    from tvm_hybrid.compiler import importer

    if spec.startswith("zoo:"):
        from tests.zoo import build as zoo_build

        zm = zoo_build(spec[4:])
        ov = [importer.InputOverride(k, tuple(v)) for k, v in zm.input_shapes.items()]
        return importer.prepare(zm.model, ov), zm.feeds
    ov = [importer.InputOverride.parse(t) for t in overrides]
    imported = importer.load(spec, ov)
    rng = np.random.RandomState(0)
    feeds = {s.name: rng.uniform(0, 1, s.shape).astype(s.dtype) for s in imported.inputs}
    return imported, feeds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an .onnx path, or zoo:NAME")
    ap.add_argument("--input", action="append", default=[], help="NAME:DIMS[:DTYPE], as the CLI takes")
    ap.add_argument("--target", default="host", help="target profile (default: host)")
    ap.add_argument("--runs", type=int, default=30, help="interleaved end-to-end runs (default 30)")
    ap.add_argument("--threads", type=int, default=2, help="threads for TVM and onnxruntime (default 2)")
    ap.add_argument("--top", type=int, default=15, help="kernels to list (default 15)")
    ap.add_argument("--no-default", action="store_true", help="skip apply_default (baseline)")
    ap.add_argument("--tuned", action="store_true", help="apply the target's tuning log, as compile does")
    ap.add_argument("--ort-no-spin", action="store_true", help="stop onnxruntime's workers spinning between runs")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    args = ap.parse_args()

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from tvm_hybrid.compiler import backends, importer, tuning_log
    from tvm_hybrid.targets import resolve

    profile = resolve(args.target)
    imported, feeds = _load(args.model, args.input)

    t0 = time.perf_counter()
    mod = importer.to_relax(imported)
    db = tuning_log.open_database(tuning_log.default_logs_dir(), profile) if args.tuned else None
    backend = backends.for_profile(profile)
    mod = backend.fuse(mod, profile) if args.no_default else backend.optimize(mod, profile, db)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = backend.build_library(mod, profile, Path(tmp) / "m.so")
        t2 = time.perf_counter()
        lib = tvm.runtime.load_module(str(result.library))
        print(f"compile: optimize {t1 - t0:.1f} s, build {t2 - t1:.1f} s; kernels {result.default_kernels}")

        dev = tvm.cpu()
        names = [s.name for s in imported.inputs]
        args_tvm = [tvm.runtime.tensor(feeds[n], dev) for n in names]
        vm = relax.VirtualMachine(lib, dev)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        if args.ort_no_spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(imported.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        def run_tvm():
            out = vm["main"](*args_tvm)
            return out

        def run_ort():
            return sess.run(None, feeds)

        # correctness
        got = _flatten(run_tvm())
        want = run_ort()
        for i, (g, w) in enumerate(zip(got, want)):
            scale = float(np.abs(w).max()) if w.size else 1.0
            err = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
            print(f"output {i}: shape {w.shape} max|err| {err:.3g} (scale {scale:.3g})")

        # Rounds of a few back-to-back runs of each, timing all but the first of a block, with a
        # pause between blocks: both thread pools spin for a while after a run, and that
        # spinning would steal the two cores from whichever engine runs next.
        tt, to = [], []
        for _ in range(args.runs):
            for fn, times in ((run_tvm, tt), (run_ort, to)):
                time.sleep(0.05)
                fn()
                for _ in range(2):
                    s = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - s)
        mt, mo = statistics.median(tt) * 1e3, statistics.median(to) * 1e3
        print(f"end-to-end median over {len(tt)} runs: TVM {mt:.2f} ms, onnxruntime {mo:.2f} ms, ratio {mt / mo:.2f}x")

        if not args.no_profile:
            _profile(vm, args_tvm, args.top, _kernel_facts(mod))
    return 0


def _flatten(out) -> list[np.ndarray]:
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    res = []
    for o in out:
        res.extend(_flatten(o))
    return res


def _kernel_facts(mod) -> dict[str, tuple[float, str]]:
    """Each kernel's floating-point operations and parameter shapes (inputs, then output)."""
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops

    facts = {}
    for gv, f in mod.functions.items():
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        try:
            flops = float(estimate_tir_flops(tvm.IRModule({"main": f})))
        except Exception:  # a kernel the estimator cannot walk
            flops = 0.0
        shapes = [p.shape for p in f.params if getattr(p, "shape", None) is not None]
        facts[gv.name_hint] = (flops, " ".join("x".join(str(d) for d in s) for s in shapes))
    return facts


def _profile(vm, args_tvm, top: int, facts: dict | None = None, rounds: int = 5) -> None:
    """Time every VM call with an instrument (TVM 0.27's VM has no profiler); medians over rounds.

    Each call is timed between the instrument's before and after hooks, so the numbers include
    a few microseconds of Python overhead a call.
    """
    import tvm

    stamps: list[tuple[str, float]] = []
    start: list[float] = [0.0]

    def instrument(func, symbol, before, ret, *args):
        if before:
            start[0] = time.perf_counter()
        else:
            stamps.append((symbol, time.perf_counter() - start[0]))
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument))
    per_round = []
    for _ in range(rounds + 1):
        stamps.clear()
        vm["main"](*args_tvm)
        per_round.append(list(stamps))
    vm.set_instrument(None)
    per_round = per_round[1:]  # the first round warms up
    n_calls = len(per_round[0])
    med = [statistics.median(r[i][1] for r in per_round) for i in range(n_calls)]
    totals: dict[str, list[float]] = {}
    for (name, _), t in zip(per_round[0], med):
        totals.setdefault(name, []).append(t)
    rows = sorted(((sum(v), len(v), k) for k, v in totals.items()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\nper-kernel (median of {rounds} instrumented runs, sum {total * 1e3:.2f} ms, {n_calls} calls):")
    facts = facts or {}
    print(f"{'ms':>8} {'%':>5} {'calls':>5} {'GFLOP/s':>7}  kernel [parameter shapes]")
    for t, n, name in rows[:top]:
        flops, shapes = facts.get(name, (0.0, ""))
        rate = f"{n * flops / t / 1e9:7.1f}" if flops and t else " " * 7
        print(f"{t * 1e3:8.3f} {100 * t / total:5.1f} {n:5d} {rate}  {name[:60]} [{shapes}]")


if __name__ == "__main__":
    raise SystemExit(main())
