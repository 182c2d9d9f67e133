#!/usr/bin/env python3
"""Tune the two shared PP-OCR models for one target into tuning_logs/<target>/.

    python scripts/tune_shared.py --target x86-64-avx2 --trials 400           # per model
    python scripts/tune_shared.py --target host --trials 800 --max-minutes 90 --models det
    python scripts/tune_shared.py --target x86-64-avx2 --trials 2000 --rpc-tracker 10.0.0.5:9190 --rpc-key box

Each model is one `tvm-hybrid tune` run (progress bar, then a per-kernel table). Runs are
resumable: rerun the same command after an interruption and it continues; raise --trials to
tune further. The budget is per model, counting records already in the log (kernels the two
models share count for both).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "det": (ROOT / "tests" / "models" / "ch_PP-OCRv4_det_infer.onnx", "x:1x3x320x320"),
    "cls": (ROOT / "tests" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "x:1x3x48x192"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", "-t", default="host", help="target profile (default: host)")
    ap.add_argument("--trials", type=int, required=True, help="measured trials per model, records already there included")
    ap.add_argument("--trials-per-task", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None, help="per model")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cls", "det"])
    ap.add_argument("--logs", default=None, help="tuning-log root (default: the repository's tuning_logs/)")
    ap.add_argument("--rpc-tracker", default=None)
    ap.add_argument("--rpc-key", default=None)
    ap.add_argument("--population", type=int, default=None)
    args = ap.parse_args(argv)
    for name in args.models:
        model, shape = MODELS[name]
        cmd = [sys.executable, "-m", "tvm_hybrid", "tune", str(model), "--target", args.target, "--input", shape,
               "--trials", str(args.trials)]  # fmt: skip
        for flag, value in (("--trials-per-task", args.trials_per_task), ("--max-minutes", args.max_minutes),
                            ("--logs", args.logs), ("--rpc-tracker", args.rpc_tracker), ("--rpc-key", args.rpc_key),
                            ("--population", args.population)):  # fmt: skip
            if value is not None:
                cmd += [flag, str(value)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc != 0:
            print(f"== {name}: tvm-hybrid tune exited {rc}; records measured so far are kept", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
