#!/usr/bin/env python3
"""TVM (tvm-hybrid artifacts) vs onnxruntime latency on the shared models, each as a user gets it.

Runs are interleaved in short blocks (ort ×5, tvm ×5, …, each block after 50 ms of untimed runs,
so the other engine's spinning threads have stopped) so all engines see the same machine state; medians are
reported, with ratios against onnxruntime in the same run, and achieved GFLOP/s against a
practical fp32 peak measured in the same run (numpy/OpenBLAS sgemm on the same threads).
MiB: onnxruntime's row the ONNX file, TVM's the artifact (library and manifest).

    python scripts/bench.py                       # the PP-OCR models and the MiniLM rows, 30 runs
    python scripts/bench.py --model det --model minilm-l3 --runs 50 --threads 1 --json bench.json
    python scripts/bench.py --model model.onnx --input x:1x3x224x224 --target x86-64
    python scripts/bench.py --model zoo:yolov8n-320 --target host --target x86-64   # both profiles, one run
    python scripts/bench.py --model zoo:vit-s16 --runs 20
    python scripts/bench.py --model det --model det-int8 --model cls --model cls-int8   # int8 (quantized on first use)
    python scripts/bench.py --model det --model det-int8 --together   # int8 vs fp32 in the same blocks
    python scripts/bench.py --model minilm-l3 --input input_ids:8x128:int64 --input attention_mask:8x128:int64

Everything runs on the device (no cloud split, whatever the profile's budget). --model takes a
name below (the MiniLM ones come from scripts/models.py's cache), zoo:NAME (a
model tests/zoo.py builds, e.g. zoo:vit-s16, ViT-S/16 with random weights) or an ONNX path; --input NAME:DIMS[:DTYPE] fixes a path's dynamic dimensions or replaces a named model's
shapes. Inputs are random: floats standard normal, integer inputs named *mask* all ones, *type*
all zeros, other integers (token ids) uniform in [1, 1000).

Without --threads the script sets no thread count anywhere (no TVM_NUM_THREADS, default
onnxruntime SessionOptions): each engine runs with the threads it picks by itself. With
--threads N, both get N (Session(threads=N), intra_op_num_threads=N). --busy-cores N times
them while another process keeps N cores busy (each engine's threads as they pick them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's tvm_hybrid, whatever is installed
sys.path.insert(0, str(ROOT / "scripts"))
#: name: (path, or a scripts/models.py name; the --input overrides it is benchmarked with)
MODELS = {
    "det": (ROOT / "tests/models/ch_PP-OCRv4_det_infer.onnx", ("x:1x3x320x320",)),
    "cls": (ROOT / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", ("x:1x3x48x192",)),
    "minilm-l3": ("minilm-l3", ("input_ids:1x128:int64", "attention_mask:1x128:int64")),
    "minilm-l6-int8": ("minilm-l6-int8", ("input_ids:1x128:int64", "attention_mask:1x128:int64",
                                          "token_type_ids:1x128:int64")),
}

#: name: (the fp32 model it is quantized from, calibration kind in scripts/calibration.py, samples).
#: Made on first use with `tvm-hybrid quantize` defaults (minmax, per-channel) into the cache.
QUANTIZED = {
    "det-int8": ("det", "det", 20),
    "cls-int8": ("cls", "cls", 40),
    "minilm-l3-int8": ("minilm-l3", "sentences", 20),
}


@dataclasses.dataclass
class Variant:
    """One way of building the model with tvm-hybrid."""

    name: str
    compile_kwargs: dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: their own)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per engine (after warm-up)")
    ap.add_argument("--target", action="append", metavar="PROFILE",
                    help="repeatable: each profile's builds run in the same blocks as the others' (default: host)")
    ap.add_argument("--model", action="append", metavar="NAME|PATH",
                    help=f"repeatable; a name ({', '.join([*MODELS, *QUANTIZED])}) or an ONNX path; default: {', '.join(MODELS)}")
    ap.add_argument("--input", action="append", default=[], metavar="NAME:DIMS[:DTYPE]",
                    help="input shapes, as compile takes them (for a path, or to change a name's)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--together", action="store_true",
                    help="interleave every model's engines in one loop (not model after model), so an int8 "
                         "model's speed-up over its fp32 model (the x fp32 column) compares one machine state")
    ap.add_argument("--busy-cores", type=int, default=0, metavar="N",
                    help="while timing, keep N cores busy with another process (a busy loop pinned to each): "
                         "a device with other work running, as edge devices have")
    args = ap.parse_args()
    if args.threads is not None:  # numpy's sgemm (the peak) reads it once, at import
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

    import numpy as np
    import onnxruntime as ort

    from tvm_hybrid.compiler import analysis, importer
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.runtime import Session
    from tvm_hybrid.targets import resolve

    profiles = list({p.name: p for p in (resolve(t) for t in args.target or ["host"])}.values())
    peak = practical_peak_gflops(np)
    variants = available_variants()
    rows, models = [], []
    with contextlib.ExitStack() as stack:
        if args.busy_cores:
            stack.enter_context(busy_cores(args.busy_cores))
        for spec in args.model or list(MODELS):
            path, overrides = resolve_model(spec, args.input)
            imp = importer.load(path, overrides)
            label = f"{spec} " + " ".join("x".join(map(str, t.shape)) for t in imp.inputs[:1])
            feeds = random_feeds(np, imp.inputs)
            gflop = sum(i.flops for i in analysis.analyze(imp)) / 1e9
            so = ort.SessionOptions()
            if args.threads is not None:
                so.intra_op_num_threads = args.threads
                so.inter_op_num_threads = 1
            ort_sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            want = ort_sess.run(None, feeds)
            engines = {"onnxruntime": lambda ort_sess=ort_sess, feeds=feeds: ort_sess.run(None, feeds)}
            sizes = {"onnxruntime": path.stat().st_size}  # the model file; TVM's: the artifact's files
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            for v, profile in [(v, p) for p in profiles for v in variants]:
                name = v.name if len(profiles) == 1 else f"{v.name} {profile.name}"
                t0 = time.perf_counter()
                [s] = compile_model(
                    CompileOptions(model=path, targets=(profile.name,), output=Path(tmp) / name,
                                   inputs=tuple(overrides), cloud=None, **v.compile_kwargs)  # fmt: skip
                )
                compile_s = time.perf_counter() - t0
                sizes[name] = s.bytes
                sess = Session(s.path, threads=args.threads)
                stack.callback(sess.close)
                tvm_threads = sess.threads
                kernels = sess.manifest.segments[0].kernels or {}
                got = list(sess.run(feeds).values())
                err = max(float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0 for g, w in zip(got, want))
                engines[name] = (lambda sess=sess, feeds=feeds: sess.run(feeds))
                print(f"# {label}: {name} compiled in {compile_s:.1f} s, kernels {kernels}, "
                      f"max |err| vs onnxruntime {err:.2e}", file=sys.stderr)  # fmt: skip
            models.append((spec, label, gflop, engines, sizes))
            if not args.together:
                models[-1] = (*models[-1][:4], sizes, interleaved(engines, args.runs))
        if args.together:  # every model's engines in the same blocks: their ratios share a machine state
            times = interleaved({(m[1], k): fn for m in models for k, fn in m[3].items()}, args.runs)
            models = [(*m, {k: times[(m[1], k)] for k in m[3]}) for m in models]
    medians = {(m[0], k): statistics.median(ts) for m in models for k, ts in m[5].items()}
    for spec, label, gflop, _, sizes, times in models:
        ort_ms = statistics.median(times["onnxruntime"])
        base = QUANTIZED.get(spec, (None,))[0]
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append(
                {
                    "model": label,
                    "engine": name,
                    "median_ms": round(ms, 3),
                    "vs_onnxruntime": round(ms / ort_ms, 2),
                    "gflops": round(gflop / (ms / 1e3), 1),
                    "pct_of_peak": round(100 * gflop / (ms / 1e3) / peak, 1),
                    "mib": round(sizes[name] / 2**20, 2),
                    "runs": len(ts),
                    # an int8 model's speed-up over its fp32 model's build, where both ran
                    **({"fp32_over_int8": round(medians[(base, name)] / ms, 2)} if (base, name) in medians else {}),
                }
            )
    threads = f"{args.threads} thread(s)" if args.threads else f"default threads (TVM: {tvm_threads})"
    target = ", ".join(p.name for p in profiles)
    print_table(rows, args, target, peak, ort.__version__, threads)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "tvm_threads": tvm_threads, "target": target,
                                         "peak_gflops": peak, "onnxruntime": ort.__version__, "rows": rows},
                                        indent=2))  # fmt: skip


def resolve_model(spec: str, inputs: list[str]):
    """(ONNX path, input overrides) for a --model name or path and the --input flags."""
    from tvm_hybrid.compiler import importer

    if spec.startswith("zoo:"):  # a model tests/zoo.py builds (zoo.NAMES or zoo.BENCH), written once
        sys.path.insert(0, str(ROOT / "tests"))
        import zoo

        z = zoo.build(spec[4:])
        path = Path(tempfile.gettempdir()) / f"tvm-hybrid-bench-{z.name}.onnx"
        data = z.model.SerializeToString()
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        given = {t.split(":", 1)[0] for t in inputs}
        texts = [f"{k}:{'x'.join(map(str, v))}" for k, v in z.input_shapes.items() if k not in given] + list(inputs)
    elif spec in QUANTIZED:
        base, kind, samples = QUANTIZED[spec]
        fp32, default = MODELS[base]
        path = quantized(model_file(fp32), kind, samples, tuple(t.split(":", 1)[0] for t in default))
        given = {t.split(":", 1)[0] for t in inputs}
        texts = [t for t in default if t.split(":", 1)[0] not in given] + list(inputs)
    elif spec in MODELS:
        path, default = MODELS[spec]
        path = model_file(path)
        given = {t.split(":", 1)[0] for t in inputs}
        texts = [t for t in default if t.split(":", 1)[0] not in given] + list(inputs)
    else:
        path, texts = Path(spec), list(inputs)
        if not path.is_file():
            raise SystemExit(f"--model {spec}: neither a name ({', '.join([*MODELS, *QUANTIZED])}) nor an ONNX file")
    return path, [importer.InputOverride.parse(t) for t in texts]


def model_file(path: Path | str) -> Path:
    """A MODELS entry's file: a path, or a scripts/models.py name (fetched into its cache)."""
    if isinstance(path, str):
        import models as cache

        return cache.path(path)
    return path


def quantized(fp32: Path, kind: str, samples: int, inputs: tuple[str, ...] = ()) -> Path:
    """The int8 QDQ model `tvm-hybrid quantize` makes of ``fp32`` from ``samples`` rendered
    calibration samples, cached by the fp32 file's hash."""
    import calibration
    from models import cache_dir

    from tvm_hybrid.compiler import quantize
    from tvm_hybrid.manifest import sha256_file

    out = cache_dir() / "quantized" / f"{fp32.stem}-{sha256_file(fp32)[:12]}-{kind}{samples}.int8.onnx"
    if not out.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            calibration.write(kind, Path(tmp), samples, inputs=inputs if kind == "sentences" else None)
            r = quantize.quantize(fp32, tmp, out)
        print(f"# quantized {fp32.name} -> {out} ({r.calibration_samples} calibration samples; loss "
              f"{100 * r.loss:.2f}%)", file=sys.stderr)  # fmt: skip
    return out


def random_feeds(np, inputs) -> dict:
    """Random inputs by name and dtype: floats standard normal; integer masks 1, type ids 0, other
    integers (token ids) in [1, 1000)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for t in inputs:
        dt = np.dtype(t.dtype)
        if dt.kind == "f":
            feeds[t.name] = rng.standard_normal(t.shape).astype(dt)
        elif "mask" in t.name.lower():
            feeds[t.name] = np.ones(t.shape, dt)
        elif "type" in t.name.lower() or dt == np.bool_:
            feeds[t.name] = np.zeros(t.shape, dt)
        else:
            feeds[t.name] = rng.integers(1, 1000, t.shape).astype(dt)
    return feeds


def available_variants() -> list[Variant]:
    """TVM untuned always; TVM tuned too once the compiler takes tuning logs."""
    from tvm_hybrid.compiler.package import CompileOptions

    if "tuning_logs" not in {f.name for f in dataclasses.fields(CompileOptions)}:
        return [Variant("tvm", {})]
    return [Variant("tvm-untuned", {"tuning_logs": None}), Variant("tvm-tuned", {})]


def interleaved(engines: dict, runs: int, block: int = 5, warmup_s: float = 1.0,
                settle_s: float = 0.05) -> dict[str, list[float]]:  # fmt: skip
    """Warm each engine up (``warmup_s`` of back-to-back runs each), then time them in turn:
    rounds of ``block`` timed runs per engine.

    Three warm-up runs were not enough: on 2 Xeon cores, PP-OCR cls timed 1.0 ms (TVM) and
    1.3 ms (onnxruntime) after three each, and 0.67-0.70 and 1.0-1.2 ms after a second each.

    Each block starts with untimed runs, at least one and for at least ``settle_s``:
    onnxruntime's and TVM's worker threads spin for a while after a run (onnxruntime's for more
    than 10 ms), and on 2 cores the runs after switching engines compete with the previous
    engine's spinning threads: they measure the switch, not the engine. After one untimed run
    only (shorter than the spin when the model is small), YOLOv8n-320 measured 1.02x and 1.08x
    onnxruntime on 2 Xeon (Emerald Rapids) vCPUs; after 50 ms, 0.96x and 0.97x; each engine
    alone in a process of its own, 0.89x. ViT-S/16 (60 ms a run) and int8 MiniLM-L6 (25 ms)
    measured the same either way.
    """
    for fn in engines.values():
        t_end = time.perf_counter() + warmup_s
        while time.perf_counter() < t_end:
            fn()
    times = {k: [] for k in engines}
    while any(len(ts) < runs for ts in times.values()):
        for k, fn in engines.items():
            t_end = time.perf_counter() + settle_s
            fn()
            while time.perf_counter() < t_end:
                fn()
            for _ in range(min(block, runs - len(times[k]))):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


@contextlib.contextmanager
def busy_cores(n: int):
    """``n`` processes spinning in a loop, each pinned to one of the last ``n`` usable cores."""
    cores = sorted(os.sched_getaffinity(0))[-n:]
    procs = [subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{c}}})\nwhile True: pass"])
             for c in cores]  # fmt: skip
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def practical_peak_gflops(np) -> float:
    """fp32 GFLOP/s of a large sgemm (numpy's threads): the machine's practical peak."""
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 / best / 1e9, 1)


def print_table(rows, args, target, peak, ort_version, threads) -> None:
    print(f"\n{threads}, target {target}, onnxruntime {ort_version}, medians of {args.runs} "
          f"interleaved runs; practical fp32 peak (sgemm) {peak} GFLOP/s\n")  # fmt: skip
    speedup = any("fp32_over_int8" in r for r in rows)
    print("| model | engine | median ms | vs onnxruntime | GFLOP/s | % of peak | MiB |" + (" fp32 / int8 |" if speedup else ""))
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if speedup else ""))
    for r in rows:
        extra = (f" {r['fp32_over_int8']:.2f}x |" if "fp32_over_int8" in r else " |") if speedup else ""
        print(f"| {r['model']} | {r['engine']} | {r['median_ms']:.2f} | {r['vs_onnxruntime']:.2f}x | "
              f"{r['gflops']:.1f} | {r['pct_of_peak']:.1f} | {r['mib']:.2f} |{extra}")  # fmt: skip


if __name__ == "__main__":
    main()
