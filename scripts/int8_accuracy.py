#!/usr/bin/env python3
"""How far the int8 PP-OCR models are from fp32 on held-out rendered samples, many of them.

    python scripts/int8_accuracy.py                      # 500 cls lines, 60 det pages
    python scripts/int8_accuracy.py --cls 1000 --det 100 --json acc.json

The int8 models are bench.py's det-int8 and cls-int8 (`tvm-hybrid quantize` defaults: minmax,
per-channel, 20 and 40 calibration samples made with seed 0, cached). The held-out samples are
scripts/calibration.py's, drawn with another seed (--seed, default 12345), so none of them was
a calibration sample. Both models run in onnxruntime: the accuracy is the quantization's; a
tvm-hybrid int8 build computes what the fp32 build of the same QDQ model does (tests/test_int8.py).

cls: top-1 agreement of int8 with fp32, and each one's accuracy against the truth (every other
line is rotated 180 degrees: label 1). det: the probability map's mean absolute error per page.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cls", type=int, default=500, help="held-out cls lines (default 500)")
    ap.add_argument("--det", type=int, default=60, help="held-out det pages (default 60)")
    ap.add_argument("--seed", type=int, default=12345, help="held-out samples' seed (calibration uses 0)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    a = ap.parse_args()

    import onnxruntime as ort
    from bench import MODELS, QUANTIZED, model_file, quantized
    from calibration import cls_sample, det_sample

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2

    def sessions(name):
        base, kind, samples = QUANTIZED[name]
        fp32 = model_file(MODELS[base][0])
        q = quantized(fp32, kind, samples)
        return (ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in (fp32, q))

    rng = random.Random(a.seed)
    out: dict = {"seed": a.seed}
    if a.cls:
        f32, i8 = sessions("cls-int8")
        agree = right32 = right8 = 0
        for i in range(a.cls):
            x = cls_sample(rng, i)["x"]
            p, q = (int(s.run(None, {"x": x})[0].argmax(-1)[0]) for s in (f32, i8))
            agree += p == q
            right32 += p == i % 2
            right8 += q == i % 2
        out["cls"] = {"samples": a.cls, "top1_agreement": agree / a.cls, "fp32_accuracy": right32 / a.cls,
                      "int8_accuracy": right8 / a.cls}  # fmt: skip
        print(f"PP-OCR cls, {a.cls} held-out lines: int8 top-1 agrees with fp32 on {agree} ({100 * agree / a.cls:.1f} %); "
              f"correct: fp32 {100 * right32 / a.cls:.1f} %, int8 {100 * right8 / a.cls:.1f} %")  # fmt: skip
    if a.det:
        f32, i8 = sessions("det-int8")
        maes = []
        for i in range(a.det):
            x = det_sample(rng, i)["x"]
            p, q = (s.run(None, {"x": x})[0] for s in (f32, i8))
            maes.append(float(np.abs(p - q).mean()))
        out["det"] = {"samples": a.det, "mae_mean": float(np.mean(maes)), "mae_max": float(np.max(maes))}
        print(f"PP-OCRv4 det, {a.det} held-out pages: probability map mean abs error {np.mean(maes):.4f} "
              f"(worst page {np.max(maes):.4f})")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
