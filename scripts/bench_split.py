#!/usr/bin/env python3
"""Measured end-to-end latency of all-device, all-cloud and the plan, on loopback with the link
shaped in the client (bandwidth and RTT), against the planner's predictions.

For each model: one build serves as all-device (run locally) and all-cloud (the same segment
served by `tvm-hybrid serve`, run with fallback=cloud). The planner's roofline times are
calibrated first from those two measured runs (device_scale, cloud_scale: measured / predicted
compute), then for each link the plan is made, compiled when it is a real split, and run.

    python scripts/bench_split.py                          # shared models + zoo, 6 links, 10 runs
    python scripts/bench_split.py --runs 20 --json split.json --model ppocr-cls

``--adaptive`` measures the runtime's per-call choice of cut instead (``compile --adaptive``): a
weaker device (the portable SSE4.2 build, one thread) against a cloud (`serve`, two threads,
AVX2) behind a throttling TCP proxy in this script (one shared link each way: bytes wait their
turn at the bandwidth, then half the RTT), a sweep of conditions (bandwidth, RTT, and the server
loaded by two other clients), and per condition every static cut's median, all-device's,
all-cloud's and the adaptive Session's — one Session for the whole sweep, so each condition
starts with estimates from the one before; its first calls after the change say how fast it
moves (``calls_to_best``), the median after ``--warmup`` calls is ``adaptive_ms``.

    python scripts/bench_split.py --adaptive --json adaptive.json
    python scripts/bench_split.py --adaptive --model ppocr-cls --runs 10
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
    ap.add_argument("--adaptive", action="store_true", help="the per-call cut choice over a sweep of conditions")
    ap.add_argument("--warmup", type=int, default=10, help="--adaptive: calls after each change before timing")
    ap.add_argument("--conditions", type=int, default=None, help="--adaptive: only the first N conditions")
    args = ap.parse_args()
    if args.adaptive:
        return adaptive_main(args)
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
        path, inputs = model_file(src, shapes, work, label)
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


def model_file(src, shapes, work: Path, label: str):
    """(ONNX path, input overrides) of a shared model's path and shapes, or of a zoo model (or a
    function making one), written into ``work``."""
    from tvm_hybrid.compiler import importer

    if not isinstance(src, Path):  # a zoo model
        z = src() if callable(src) else src
        path = work / f"{label}.onnx"
        path.write_bytes(z.model.SerializeToString())
        src, shapes = path, z.input_shapes
    return src, tuple(importer.InputOverride(k, tuple(v)) for k, v in shapes.items())


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

    def __init__(self, artifacts, *flags: str):
        self.artifacts, self.flags = artifacts, flags

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "tvm_hybrid", "serve", *map(str, self.artifacts),
                                      "--port", str(port), *self.flags], stderr=subprocess.DEVNULL,
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


# --------------------------------------------------------------------------------------------
# --adaptive
# --------------------------------------------------------------------------------------------
#: (bandwidth Mbps, RTT ms, other clients loading the server), in the order they follow each other:
#: every step changes the link or the load, fast ↔ slow, so the Session has to move.
CONDITIONS = [(100, 10, 0), (1, 100, 0), (20, 10, 0), (5, 100, 0), (100, 100, 0), (1, 10, 0), (5, 10, 0),
              (20, 100, 0), (100, 10, 2), (20, 10, 2), (100, 10, 0)]  # fmt: skip

#: The device: the portable SSE4.2 build without its dispatch variants, run on one thread.
EDGE_PROFILE = """name = "edge-x86"
description = "bench_split --adaptive's device: portable x86-64 (SSE4.2), no dispatch variants"
family = "x86"
placement = "device"
backend = "cpu"

[tvm]
target = { kind = "llvm", mtriple = "x86_64-linux-gnu", mcpu = "x86-64-v2" }

[toolchain]
cc = ""
install = "apt-get install -y g++"

[capacity]
memory_bytes = 2147483648
peak_gflops = 25.0
bandwidth_gbps = 10.0
dtypes = ["float32", "int8", "uint8", "int32", "int64", "bool"]
unsupported_ops = []

[link]
bandwidth = "20Mbps"
rtt = "40ms"
"""


def adaptive_models():
    import zoo

    return {
        "ppocr-cls": (ROOT / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}),
        "ppocr-det": (ROOT / "tests/models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}),
        "zoo-yolov8-320": (lambda: zoo.yolov8("yolov8-320", 320), None),
        # ViT-Ti/16: compute-heavy for its input, and small after the patch embedding
        "zoo-vit-ti16": (lambda: zoo.vit("vit_ti16", 224, 16, 192, 12, 3, 1000), None),
    }


class ShapedLink:
    """A TCP proxy on loopback shaping a link like a real one: per direction one queue shared by
    every connection, each chunk sent at the bandwidth after the ones before it, then delivered
    half the RTT later. ``set`` changes both while connections stay open."""

    def __init__(self, upstream_port: int):
        import asyncio
        import threading

        self.upstream, self.bandwidth_bps, self.rtt_ms = upstream_port, 1e9, 0.0
        self._free = {"up": 0.0, "down": 0.0}
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self._loop)
            srv = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True, name="shaped-link").start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def set(self, bandwidth_bps: float, rtt_ms: float) -> None:
        self.bandwidth_bps, self.rtt_ms = bandwidth_bps, rtt_ms

    async def _handle(self, reader, writer):
        import asyncio

        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_w, "up"), self._pump(up_r, writer, "down"), return_exceptions=True)

    async def _pump(self, reader, writer, direction: str) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                at, data = await q.get()
                if at > loop.time():
                    await asyncio.sleep(at - loop.time())
                if data is None:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(16384)
                now = loop.time()
                if not data:
                    break
                done = max(now, self._free[direction]) + len(data) * 8 / self.bandwidth_bps
                self._free[direction] = done
                await q.put((done + self.rtt_ms / 2e3, data))
        finally:
            await q.put((loop.time() + self.rtt_ms / 2e3, None))
            await task


class Load:
    """Other clients keeping the server busy: ``n`` threads calling one endpoint in a loop."""

    def __init__(self, url: str, model: str, version: str, feeds):
        self.url, self.model, self.version, self.feeds = url, model, version, feeds
        self._threads, self._stop = [], None

    def set(self, n: int) -> None:
        import threading

        from tvm_hybrid.runtime.cloud import CloudClient

        if self._stop is not None:
            self._stop.set()
            for t in self._threads:
                t.join()
            self._threads, self._stop = [], None
        if not n:
            return
        stop = self._stop = threading.Event()

        def loop():
            c = CloudClient(self.url)
            while not stop.is_set():
                try:
                    c.infer(self.model, self.version, self.feeds)
                except Exception:
                    time.sleep(0.05)
            c.close()

        self._threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()


def adaptive_main(args) -> None:
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="bench-adaptive-"))
    (work / "targets").mkdir()
    (work / "targets" / "edge-x86.toml").write_text(EDGE_PROFILE)
    os.environ["TVM_HYBRID_TARGETS_PATH"] = str(work / "targets")  # this process and the server's
    from tvm_hybrid.compiler.package import CompileOptions, PlanSettings, compile_model
    from tvm_hybrid.runtime import Session

    rows = []
    for label, (src, shapes) in adaptive_models().items():
        if args.model and label not in args.model:
            continue
        path, inputs = model_file(src, shapes, work, label)
        out = work / label
        t0 = time.perf_counter()
        compile_model(CompileOptions(model=path, targets=("edge-x86",), output=out, inputs=inputs, adaptive=True,
                                     plan=PlanSettings(keep_input_local=False)))  # fmt: skip
        print(f"# {label}: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        dev = out / "edge-x86"
        manifest = json.loads((dev / "manifest.json").read_text())
        cuts = [c["name"] for c in manifest["cuts"]]
        rng = np.random.default_rng(0)
        feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in manifest["inputs"]}
        heaviest = max((s for s in manifest["segments"] if s["placement"] == "cloud"), key=lambda s: s["predicted"]["flops"])
        with Server([out / "cloud-x86"], "--workers", "1", "--threads", "2") as direct:
            link = ShapedLink(int(direct.rsplit(":", 1)[1]))
            # Other clients' requests: the heaviest cloud segment, on inputs of its shapes.
            load_feeds = {t["name"]: rng.standard_normal(t["shape"]).astype(t["dtype"]) for t in heaviest["inputs"]}
            load = Load(direct, heaviest["endpoint"]["model"], heaviest["endpoint"]["version"], load_feeds)
            statics = {c: Session(dev, cloud_url=link.url, cut=c, fallback="off", threads=1, probe_interval=0) for c in cuts}
            adaptive = Session(dev, cloud_url=link.url, fallback="off", threads=1)
            try:
                link.set(1e9, 0)
                for sess in statics.values():  # first calls pay one-time costs
                    sess.run(feeds)
                for bw, rtt, n_load in CONDITIONS[: args.conditions]:
                    link.set(bw * 1e6, rtt)
                    load.set(n_load)
                    time.sleep(0.3)
                    run = []
                    for _ in range(args.warmup + args.runs):
                        t = time.perf_counter()
                        adaptive.run(feeds)
                        run.append((adaptive.decision.cut, (time.perf_counter() - t) * 1e3, adaptive.decision.why))
                    static_ms = {c: measure_within(lambda s=sess: s.run(feeds), args.runs) for c, sess in statics.items()}
                    best = min(static_ms, key=static_ms.get)
                    good = {c for c, ms in static_ms.items() if ms <= 1.1 * static_ms[best]}
                    to_best = next((i + 1 for i, (c, _, _) in enumerate(run) if c in good), None)
                    adaptive_ms = statistics.median(ms for _, ms, _ in run[args.warmup:])
                    row = {"model": label, "bandwidth_mbps": bw, "rtt_ms": rtt, "server_load": n_load,
                           "static_ms": static_ms, "all_device_ms": static_ms.get("all-device"),
                           "all_cloud_ms": static_ms.get("all-cloud"), "adaptive_ms": adaptive_ms,
                           "best_static": best, "calls_to_best": to_best,
                           "adaptive_cuts": [c for c, _, _ in run], "explored": sum(w == "explore" for _, _, w in run)}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
            finally:
                load.set(0)
                adaptive.close()
                for sess in statics.values():
                    sess.close()
    print_adaptive(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"conditions": rows}, indent=2))


def measure_within(fn, runs: int, budget_s: float = 30.0) -> float:
    """Median of ``runs`` calls, fewer (at least 3) when they would take over ``budget_s``."""
    ts = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < runs and (len(ts) < 3 or time.perf_counter() < t_end):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def print_adaptive(rows, args) -> None:
    print(f"\nmedians; adaptive: one Session through the sweep, median of {args.runs} calls after {args.warmup}\n")
    print("| model | Mbps | RTT ms | load | best static | its ms | all-device | all-cloud | adaptive | vs best | "
          "vs worse end | calls to best |")  # fmt: skip
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        best = r["static_ms"][r["best_static"]]
        ends = [v for v in (r["all_device_ms"], r["all_cloud_ms"]) if v is not None]

        def f(v):
            return f"{v:.1f}" if v is not None else "–"

        print(f"| {r['model']} | {r['bandwidth_mbps']:g} | {r['rtt_ms']:g} | {r['server_load']} | {r['best_static']} | "
              f"{best:.1f} | {f(r['all_device_ms'])} | {f(r['all_cloud_ms'])} | {r['adaptive_ms']:.1f} | "
              f"{r['adaptive_ms'] / best:.2f}x | {max(ends) / r['adaptive_ms']:.1f}x | {r['calls_to_best']} |")  # fmt: skip


if __name__ == "__main__":
    main()
