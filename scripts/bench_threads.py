#!/usr/bin/env python3
"""The runtime's threads as a user gets them: a Session with no settings against the same Session
with TVM_NUM_THREADS set to the core count, one thread, and onnxruntime's defaults, in one run.

The thread count of TVM's runtime is process state (an environment variable read by native code,
a thread pool per calling thread), so each engine lives in its own worker process, started with
its own environment; this script compiles each model once, then drives the workers in
interleaved blocks (each: one untimed run, then ``--block`` timed ones, timed inside the worker)
after a second of warm-up each, and reports medians. Workers wait on a pipe while another runs;
the order rotates every round, so no engine always follows onnxruntime's spinning threads.

    python scripts/bench_threads.py                       # PP-OCRv4 det and MiniLM-L3 (seq 128)
    python scripts/bench_threads.py --model det --runs 60 --json threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def models() -> dict[str, tuple[Path, dict[str, tuple[tuple[int, ...], str]]]]:
    import models as cache

    minilm = {"input_ids": ((1, 128), "int64"), "attention_mask": ((1, 128), "int64")}
    return {
        "det": (ROOT / "tests/models/ch_PP-OCRv4_det_infer.onnx", {"x": ((1, 3, 320, 320), "float32")}),
        "minilm-l3": (cache.path("minilm-l3"), minilm),
    }


WORKER = r"""
import json, sys, time
import numpy as np
kind, path, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rng = np.random.default_rng(0)
feeds = {}
for name, (shape, dtype) in spec.items():
    feeds[name] = (rng.integers(1, 1000, shape) if dtype == "int64" else rng.standard_normal(shape)).astype(dtype)
    if name == "attention_mask":
        feeds[name][:] = 1
if kind == "onnxruntime":
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])   # its defaults
    run, threads = (lambda: sess.run(None, feeds)), None
else:
    from tvm_hybrid.runtime import Session
    sess = Session(path, **json.loads(kind))
    run = lambda: sess.run(feeds)
    run()
    threads = sess.trace[0].get("threads")
print(json.dumps({"ready": True, "threads": threads}), flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "warm":
        t_end = time.perf_counter() + float(arg)
        while time.perf_counter() < t_end:
            run()
        print("[]", flush=True)
    else:
        run()  # untimed: the previous engine's threads may still be spinning
        ts = []
        for _ in range(int(arg)):
            t0 = time.perf_counter()
            run()
            ts.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps(ts), flush=True)
"""


class Worker:
    def __init__(self, kind: str, path: Path, spec: dict, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, kind, str(path), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))},
        )  # fmt: skip
        hello = json.loads(self.proc.stdout.readline() or "{}")
        if not hello.get("ready"):
            raise SystemExit(f"worker {kind} failed to start (exit {self.proc.wait()})")
        self.threads = hello["threads"]

    def ask(self, cmd: str, arg) -> list[float]:
        self.proc.stdin.write(f"{cmd} {arg}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=["det", "minilm-l3"], help="default: both")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per engine")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--target", default="host")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tvm_hybrid.compiler import importer
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.runtime.threads import usable_cores

    cores = usable_cores()
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    engines = {  # label: (worker kind, environment)
        "tvm: Session(), no settings": ("{}", clean),
        f"tvm: TVM_NUM_THREADS={cores}": ("{}", {**clean, "TVM_NUM_THREADS": str(cores)}),
        "tvm: Session(threads=1)": ('{"threads": 1}', clean),
        "onnxruntime: defaults": ("onnxruntime", clean),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (path, spec) in models().items():
            if args.model and label not in args.model:
                continue
            inputs = tuple(importer.InputOverride(n, s, d) for n, (s, d) in spec.items())
            [art] = compile_model(CompileOptions(model=path, targets=(args.target,), output=Path(tmp) / label,
                                                 inputs=inputs))  # fmt: skip
            workers = {}
            try:
                for name, (kind, env) in engines.items():
                    workers[name] = Worker(kind, path if kind == "onnxruntime" else art.path, spec, env)
                for w in workers.values():
                    w.ask("warm", 1.0)
                times = {name: [] for name in workers}
                order = list(workers)
                while any(len(ts) < args.runs for ts in times.values()):
                    for name in order:
                        times[name] += workers[name].ask("block", min(args.block, args.runs - len(times[name])) or 1)
                    order = order[1:] + order[:1]  # each engine follows each other one in turn
            finally:
                for w in workers.values():
                    w.close()
            base = statistics.median(times["tvm: Session(), no settings"])
            for name, ts in times.items():
                ms = statistics.median(ts)
                rows.append({"model": label, "engine": name, "threads": workers[name].threads,
                             "median_ms": round(ms, 3), "vs_default_session": round(ms / base, 3), "runs": len(ts)})  # fmt: skip

    import onnxruntime as ort

    print(f"\n{cores} usable core(s), target {args.target}, onnxruntime {ort.__version__}, medians of {args.runs} "
          f"runs in interleaved blocks of {args.block}\n")  # fmt: skip
    print("| model | engine | TVM threads | median ms | vs Session() |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['threads'] or '-'} | {r['median_ms']:.2f} | "
              f"{r['vs_default_session']:.2f}x |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "target": args.target, "onnxruntime": ort.__version__,
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
