#!/usr/bin/env python3
"""Measured end-to-end latency of all-device, all-cloud and the plan, on loopback with the link
shaped in the client (bandwidth and RTT), against the planner's predictions.

For each model: one build serves as all-device (run locally) and all-cloud (the same segment
served by `tvm-hybrid serve`, run with fallback=cloud). The planner's roofline times are
calibrated first from those two measured runs (device_scale, cloud_scale: measured / predicted
compute), then for each link the plan is made, compiled when it is a real split, and run.

    python scripts/bench_split.py                          # shared models + zoo, 6 links, 10 runs
    python scripts/bench_split.py --runs 20 --json split.json --model ppocr-cls
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's tvm_hybrid, whatever is installed
sys.path.insert(0, str(ROOT / "tests"))

LINKS = [(bw, rtt) for bw in ("1Mbps", "10Mbps", "100Mbps") for rtt in ("20ms", "80ms")]


def models():
    import zoo

    # (model, input shapes, a device memory budget the model does not fit in)
    out = {
        "ppocr-cls": (ROOT / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}, "600KiB"),
        "ppocr-det": (ROOT / "tests/models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}, "6MiB"),
    }
    for name, budget in (("resnet_block", "40KiB"), ("attention", "60KiB")):
        out[f"zoo-{name}"] = (zoo.build(name), None, budget)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--target", default="host")
    ap.add_argument("--model", action="append")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import numpy as np

    from tvm_hybrid.compiler import importer
    from tvm_hybrid.compiler.package import CompileOptions, PlanSettings, compile_model, plan_for
    from tvm_hybrid.runtime import Session
    from tvm_hybrid.runtime.cloud import LinkShaper
    from tvm_hybrid.targets import resolve

    device, cloud = resolve(args.target), resolve("cloud-x86")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-split-"))
    for label, (src, shapes, budget) in models().items():
        if args.model and label not in args.model:
            continue
        if not isinstance(src, Path):  # a zoo model
            path = work / f"{label}.onnx"
            path.write_bytes(src.model.SerializeToString())
            shapes = src.input_shapes
        else:
            path = src
        inputs = tuple(importer.InputOverride(k, tuple(v)) for k, v in shapes.items())
        imp = importer.load(path, list(inputs))
        rng = np.random.default_rng(0)
        feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in imp.inputs}

        # 1. One segment, served too: all-device locally, all-cloud with fallback=cloud.
        base = PlanSettings(bandwidth="1bps", keep_input_local=False)
        whole = work / label / "whole"
        compile_model(CompileOptions(model=path, targets=(device.name,), output=whole, inputs=inputs, plan=base))
        _, whole_plan = plan_for(imp, device, cloud, base)
        with Server([whole / cloud.name]) as url:
            with Session(whole / device.name, fallback="off") as s:
                dev_ms = measure(lambda: s.run(feeds), args.runs)
            with Session(whole / device.name, cloud_url=url, fallback="cloud") as s:
                cloud_compute_ms = measure(lambda: s.run(feeds), args.runs)  # loopback, unshaped
        pred_dev = whole_plan.baselines["all-device"].device_ms
        pred_cloud = whole_plan.baselines["all-cloud"].cloud_ms
        cal = dict(device_scale=dev_ms / pred_dev, cloud_scale=max(cloud_compute_ms, 1e-3) / pred_cloud)
        print(f"# {label}: calibration {cal}", file=sys.stderr)

        # 2. Each link, with the profile's memory and with a budget the model does not fit in:
        #    plan (calibrated), build the split if it is one, run all three shaped.
        built: dict[tuple, Path] = {}
        for (bw, rtt), memory in [(link, m) for link in LINKS for m in (None, budget)]:
            settings = PlanSettings(bandwidth=bw, rtt=rtt, memory=memory, **cal)
            graph, plan = plan_for(imp, device, cloud, settings)
            key = tuple(plan.on_device)
            shaper = LinkShaper(_bps(bw), _ms(rtt))
            measured = {}
            with Session(whole / device.name, fallback="off") as s:
                measured["all-device"] = measure(lambda: s.run(feeds), args.runs)
            with Server([whole / cloud.name]) as url, \
                    Session(whole / device.name, cloud_url=url, fallback="cloud", link=shaper) as s:  # fmt: skip
                measured["all-cloud"] = measure(lambda: s.run(feeds), args.runs)
            if all(key):
                measured["plan"] = measured["all-device"]
                shape = "all-device"
            else:
                if key not in built:
                    out = work / label / f"split{len(built)}"
                    compile_model(CompileOptions(model=path, targets=(device.name,), output=out, inputs=inputs,
                                                 plan=settings))  # fmt: skip
                    built[key] = out
                out = built[key]
                with Server([out / cloud.name]) as url, \
                        Session(out / device.name, cloud_url=url, fallback="off", link=shaper) as s:  # fmt: skip
                    measured["plan"] = measure(lambda: s.run(feeds), args.runs)
                shape = f"{sum(key)}/{len(key)} ops on device"
            b = plan.baselines
            rows.append(
                {
                    "model": label, "link": f"{bw} {rtt}", "memory": memory or "profile", "plan": shape,
                    "predicted_ms": {"all-device": b["all-device"].total_ms if b["all-device"] else None,
                                     "all-cloud": b["all-cloud"].total_ms if b["all-cloud"] else None,
                                     "plan": plan.cost.total_ms},
                    "measured_ms": measured,
                }
            )  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(rows, args.runs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _bps(text: str) -> float:
    from tvm_hybrid.compiler.plan import parse_bandwidth

    return parse_bandwidth(text)


def _ms(text: str) -> float:
    from tvm_hybrid.compiler.plan import parse_duration_ms

    return parse_duration_ms(text)


def measure(fn, runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


class Server:
    """`tvm-hybrid serve` in a subprocess on a free loopback port."""

    def __init__(self, artifacts):
        self.artifacts = artifacts

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "tvm_hybrid", "serve", *map(str, self.artifacts),
                                      "--port", str(port)], stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=1)
                return url
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def print_table(rows, runs) -> None:
    print(f"\nmedians of {runs} runs, loopback with the link shaped in the client; predicted → measured ms\n")
    print("| model | link | memory | plan | all-device | all-cloud | plan | plan ≤ both? | plan error |")
    print("|---|---|---|---|---:|---:|---:|:---:|---:|")
    for r in rows:
        p, m = r["predicted_ms"], r["measured_ms"]

        def cell(k):
            return f"{p[k]:.1f} → {m[k]:.1f}" if p[k] is not None else f"– → {m[k]:.1f}"

        # Only feasible alternatives count: all-device over the budget is no option.
        rivals = [m[k] for k in ("all-device", "all-cloud") if p[k] is not None]
        ok = m["plan"] <= min(rivals) * 1.05
        err = (p["plan"] - m["plan"]) / m["plan"] * 100
        print(f"| {r['model']} | {r['link']} | {r['memory']} | {r['plan']} | {cell('all-device')} | {cell('all-cloud')} | "
              f"{cell('plan')} | {'yes' if ok else 'NO'} | {err:+.0f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
