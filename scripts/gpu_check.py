#!/usr/bin/env python3
"""CUDA artifacts compiled here, checked on a machine with an NVIDIA GPU and only the runtime.

A GPU machine may have no TVM compiler (libtvm_compiler alone is 259 MB) and no nvcc; the
runtime needs neither. So the check is split: ``prepare`` compiles the models for a CUDA
profile on this machine (nvcc, no GPU needed), with their inputs and onnxruntime's (CPU)
outputs; ``run`` there opens each artifact with ``Session``, compares, and times it.

    python scripts/gpu_check.py prepare .gpu --target cuda-sm90      # here
    python scripts/gpu_check.py runtime .gpu/site                    # here: TVM without its compiler
    PYTHONPATH=.gpu/site python scripts/gpu_check.py run .gpu        # there; --json FILE

Tolerances against onnxruntime: fp32 rtol 1e-3, atol 1e-4 (nvcc's fast math, another summation
order; as tests/test_cuda.py); fp16 builds atol 1e-3 on probabilities (fp16 operands, fp32
accumulation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLS = ROOT / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
DET = ROOT / "tests/models/ch_PP-OCRv4_det_infer.onnx"
#: name: (model path or zoo:NAME, input shapes or None for the zoo's, precision)
MODELS = {
    "cls-1x3x48x192": (CLS, {"x": (1, 3, 48, 192)}, "fp32"),
    "cls-8x3x48x192": (CLS, {"x": (8, 3, 48, 192)}, "fp32"),
    "det-1x3x320x320": (DET, {"x": (1, 3, 320, 320)}, "fp32"),
    "cls-fp16": (CLS, {"x": (1, 3, 48, 192)}, "fp16"),
    "zoo-attention": ("zoo:attention", None, "fp32"),
    "zoo-vit_tiny": ("zoo:vit_tiny", None, "fp32"),
    "zoo-resnet_block": ("zoo:resnet_block", None, "fp32"),
    "zoo-if_runtime": ("zoo:if_runtime", None, "fp32"),
    "zoo-crnn_lstm": ("zoo:crnn_lstm", None, "fp32"),
}


def prepare(out: Path, target: str) -> None:
    import numpy as np
    import onnxruntime as ort

    import zoo
    from conftest import text_image
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, (src, shapes, precision) in MODELS.items():
        if isinstance(src, str):
            z = zoo.build(src[4:])
            path = out / f"{name}.onnx"
            path.write_bytes(z.model.SerializeToString())
            feeds, shapes = z.feeds, z.input_shapes
        else:
            path = src
            (n, _, h, w) = shapes["x"]
            feeds = {"x": text_image(n, h, w)}
        t0 = time.perf_counter()
        try:
            [s] = compile_model(CompileOptions(model=path, targets=(target,), output=out / name, cloud=None,
                                               inputs=tuple(InputOverride(k, tuple(v)) for k, v in shapes.items()),
                                               precision=precision))  # fmt: skip
        except Exception as e:  # a model this target refuses is reported, not fatal
            print(f"{name}: not compiled: {e}")
            continue
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        np.savez(out / f"{name}.io.npz", **{f"in:{k}": v for k, v in feeds.items()}, **{f"out:{k}": v for k, v in want.items()})
        index[name] = {"artifact": str(s.path.relative_to(out)), "precision": precision}
        print(f"{name}: {s.path} {s.bytes / 2**20:.2f} MiB in {time.perf_counter() - t0:.1f} s")
    (out / "index.json").write_text(json.dumps(index, indent=1))


def runtime(site: Path) -> None:
    """TVM's Python package without its compiler library and headers, for the GPU machine."""
    import tvm_ffi

    import tvm

    src = Path(tvm.__file__).parent
    dst = site / "tvm"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("libtvm_compiler.so", "3rdparty", "__pycache__", "*.a"))
    print(f"{dst}: {sum(f.stat().st_size for f in dst.rglob('*') if f.is_file()) / 2**20:.1f} MiB; "
          f"carry a tvm_ffi {getattr(tvm_ffi, '__version__', '')} wheel for the GPU machine's Python too")


def run(root: Path, runs: int, json_out: Path | None) -> int:
    import numpy as np

    from tvm_hybrid.runtime import Session

    index = json.loads((root / "index.json").read_text())
    rows, failed = [], 0
    for name, info in index.items():
        io = np.load(root / f"{name}.io.npz")
        feeds = {k[3:]: io[k] for k in io.files if k.startswith("in:")}
        want = {k[4:]: io[k] for k in io.files if k.startswith("out:")}
        row = {"model": name, "precision": info["precision"]}
        try:
            with Session(root / info["artifact"]) as sess:
                got = sess.run(feeds)
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    sess.run(feeds)
                    times.append((time.perf_counter() - t0) * 1e3)
                row["device"] = sess.trace[0].get("ran_on") or sess.trace[0].get("device")
            errs = {k: float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want if want[k].dtype.kind == "f"}
            ok = all(np.array_equal(got[k], want[k]) if want[k].dtype.kind != "f" else
                     np.allclose(got[k], want[k], rtol=1e-3, atol=1e-3 if info["precision"] == "fp16" else 1e-4)
                     for k in want)  # fmt: skip
            row.update(ok=bool(ok), max_abs_err=errs, median_ms=round(statistics.median(times), 3))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        failed += not row["ok"]
        rows.append(row)
        print(json.dumps(row))
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--target", default="cuda-sm90")
    r = sub.add_parser("runtime")
    r.add_argument("site", type=Path)
    x = sub.add_parser("run")
    x.add_argument("dir", type=Path)
    x.add_argument("--runs", type=int, default=50)
    x.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.dir, a.target)
    elif a.cmd == "runtime":
        runtime(a.site)
    else:
        return run(a.dir, a.runs, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
