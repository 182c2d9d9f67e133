#!/usr/bin/env python3
"""TVM (tvm-hybrid CUDA artifacts) vs onnxruntime's CUDA provider on this machine's GPU.

For a machine with an NVIDIA GPU and driver. Compiles the shared models (and a few zoo models)
for the built-in profile that fits GPU 0 (or --target), checks the outputs against onnxruntime
on the CPU, then times, interleaved (ort-cuda, tvm, ort-cuda, tvm, …), each engine's full call
from host numpy arrays to host numpy arrays (both copy in and out), and reports medians and
the ratio against onnxruntime-gpu. Without onnxruntime-gpu installed, onnxruntime's CPU
provider is the baseline and the table says so.

    python scripts/bench_cuda.py                         # profile picked from GPU 0
    python scripts/bench_cuda.py --target cuda-sm87 --runs 100 --json bench-cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
MODELS = {
    "ppocr-cls 1x3x48x192": (ROOT / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}),
    "ppocr-cls 8x3x48x192": (ROOT / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (8, 3, 48, 192)}),
    "ppocr-det 1x3x640x640": (ROOT / "tests/models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 640, 640)}),
    "zoo resnet_block": ("zoo:resnet_block", None),
    "zoo attention": ("zoo:attention", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="CUDA profile (default: the one that fits GPU 0)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per engine (after warm-up)")
    ap.add_argument("--model", action="append", choices=list(MODELS), help="default: all")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    from bench import interleaved  # scripts/bench.py: warm-up, then engines timed in turn

    from tvm_hybrid.compiler.backends.cuda import profile_for_gpu
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.runtime import Session
    from tvm_hybrid.runtime.cuda import gpu_compute_capability

    cc = gpu_compute_capability(0)
    if cc is None:
        sys.exit("bench_cuda: no NVIDIA GPU (the driver reports none); run this on a machine with one")
    target = args.target or profile_for_gpu(cc)
    if target is None:
        sys.exit(f"bench_cuda: no built-in CUDA profile fits compute capability {cc}; pass --target")
    has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    baseline = "onnxruntime-cuda" if has_ort_cuda else "onnxruntime-cpu"
    print(f"# GPU 0 compute capability {cc}, target {target}, baseline {baseline}", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.model or list(MODELS):
            model_path, shapes = MODELS[label]
            if str(model_path).startswith("zoo:"):
                import zoo

                z = zoo.build(str(model_path)[4:])
                model_path = Path(tmp) / f"{z.name}.onnx"
                model_path.write_bytes(z.model.SerializeToString())
                shapes, feeds = z.input_shapes, z.feeds
            else:
                rng = np.random.default_rng(0)
                feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
            t0 = time.perf_counter()
            [s] = compile_model(CompileOptions(model=Path(model_path), targets=(target,), output=Path(tmp) / label,
                                               inputs=tuple(InputOverride(k, v) for k, v in shapes.items())))  # fmt: skip
            compile_s = time.perf_counter() - t0
            cpu = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
            ref = cpu.run(None, feeds)
            providers = ["CUDAExecutionProvider"] if has_ort_cuda else ["CPUExecutionProvider"]
            base = ort.InferenceSession(str(model_path), providers=providers)
            with Session(s.path) as sess:
                got = list(sess.run(feeds).values())
                err = max(float(np.max(np.abs(g.astype(np.float64) - r))) for g, r in zip(got, ref))
                engines = {baseline: lambda: base.run(None, feeds), "tvm-hybrid": lambda: sess.run(feeds)}
                times = interleaved(engines, args.runs)
            base_ms = statistics.median(times[baseline])
            for name, ts in times.items():
                ms = statistics.median(ts)
                rows.append({"model": label, "engine": name, "median_ms": round(ms, 3),
                             "vs_baseline": round(ms / base_ms, 2), "max_abs_err_vs_ort_cpu": err if name != baseline else None,
                             "compile_s": round(compile_s, 1) if name != baseline else None})  # fmt: skip
            print(f"# {label}: compiled in {compile_s:.1f} s, max |tvm - ort-cpu| = {err:.2e}", file=sys.stderr)
    print(f"\nGPU compute capability {cc}, target {target}; medians of {args.runs} interleaved runs, "
          f"host arrays in and out; baseline {baseline}\n")  # fmt: skip
    print(f"| model | engine | median ms | vs {baseline} | max abs err vs ort-cpu |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        err = "" if r["max_abs_err_vs_ort_cpu"] is None else f"{r['max_abs_err_vs_ort_cpu']:.1e}"
        print(f"| {r['model']} | {r['engine']} | {r['median_ms']:.3f} | {r['vs_baseline']:.2f}x | {err} |")
    if args.json:
        args.json.write_text(json.dumps({"compute_capability": cc, "target": target, "baseline": baseline,
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
