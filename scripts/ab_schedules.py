#!/usr/bin/env python3
"""Default-schedule settings against each other and onnxruntime, in one interleaved run.

Each variant overrides fields of the target's ``backends.cpu.CpuConfig``; the untuned model is
built once per variant (no tuning log) and timed with bench.py's interleaving (a second of
warm-up per engine, blocks of 5, medians), so the ratios come from the same machine state.

    python scripts/ab_schedules.py --model det --variant max_cols=1            # current vs one column
    python scripts/ab_schedules.py --model cls --variant parallel_min_work=1048576 --runs 300
    python scripts/ab_schedules.py --model det --target x86-64-avx2 --variant max_cols=1 --variant max_cols=4
    python scripts/ab_schedules.py --model zoo:vit-s16 --variant parallel_min_work=16384

--model takes what bench.py's does: a name, zoo:NAME or an ONNX path (with --input NAME:DIMS[:DTYPE]).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the models and the interleaving)


def _variant(text: str) -> dict[str, int]:
    """``field=int[,field=int…]`` → overrides of CpuConfig."""
    fields = {f.name for f in dataclasses.fields(_cpu_config_class())}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in fields or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: want FIELD=INT with FIELD one of {', '.join(sorted(fields))}")
        out[key] = int(value)
    return out


def _cpu_config_class():
    from tvm_hybrid.compiler.backends.cpu import CpuConfig

    return CpuConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, metavar="NAME|zoo:NAME|PATH")
    ap.add_argument("--input", action="append", default=[], metavar="NAME:DIMS[:DTYPE]")
    ap.add_argument("--variant", type=_variant, action="append", default=[], help="FIELD=INT[,FIELD=INT…]; repeatable")
    ap.add_argument("--target", default="host")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=60, help="timed runs per engine")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from tvm_hybrid.compiler import backends, importer
    from tvm_hybrid.compiler.backends import cpu as schedules
    from tvm_hybrid.targets import resolve

    profile = resolve(args.target)
    base = schedules.cpu_config(profile.tvm())
    path, overrides = bench.resolve_model(args.model, args.input)
    imported = importer.load(path, overrides)
    shape = imported.inputs[0].shape
    fused = backends.for_profile(profile).fuse(importer.to_relax(imported), profile)
    feeds = bench.random_feeds(np, imported.inputs)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    engines = {f"onnxruntime {ort.__version__}": lambda: sess.run(None, feeds)}
    xt = [tvm.runtime.tensor(feeds[t.name]) for t in imported.inputs]
    with tempfile.TemporaryDirectory() as tmp:
        for i, over in enumerate([{}, *args.variant]):
            cfg = dataclasses.replace(base, **over)
            mod = schedules.apply_default(fused, profile, cfg)
            lib = backends.for_profile(profile).build_library(mod, profile, Path(tmp) / f"v{i}.so").library
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
            out = vm["main"](*xt)
            got = (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()
            name = ",".join(f"{k}={v}" for k, v in over.items()) or "current"
            print(f"# {name}: max |err| vs onnxruntime {float(np.abs(got - want).max()):.2e}", file=sys.stderr)
            engines[name] = lambda vm=vm: vm["main"](*xt)
        times = bench.interleaved(engines, args.runs)
    ref = statistics.median(next(iter(times.values())))
    print(f"\n{args.model} {'x'.join(map(str, shape))}, target {profile.name}, {args.threads} thread(s), "
          f"medians of {args.runs} interleaved runs; base {base}\n")  # fmt: skip
    print("| engine | median ms | vs onnxruntime |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.3f} | {ms / ref:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
