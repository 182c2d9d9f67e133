#!/usr/bin/env python3
"""Load on `tvm-hybrid serve`: N concurrent clients for T seconds with a real split-segment payload.

    python scripts/load.py                              # compiles PP-OCR cls split, serves it, 8 x 60 s
    python scripts/load.py --artifacts OUT --clients 8 --seconds 60 --workers 2
    python scripts/load.py --url http://host:8000 --artifacts OUT --token-file tok

The payload is the real boundary tensor: the device segment of OUT/<device target> runs once on
an image here, and every client sends its output to the cloud segment through the runtime's
CloudClient (binary tensors, keep-alive, the hardened client). ``--mode session`` runs the whole
Session per request instead (device segment here, cloud segment there). Every reply is checked
against the first one; a wrong or failed reply is an error. Prints p50/p99/throughput/errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLS = ROOT / "tests" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def compile_split(out: Path) -> None:
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, PlanSettings, compile_model

    print(f"load: compiling PP-OCR cls split (600 KiB device budget) into {out}", file=sys.stderr)
    compile_model(CompileOptions(model=CLS, targets=("x86-64-avx2",), output=out,
                                 inputs=(InputOverride("x", (1, 3, 48, 192)),), plan=PlanSettings(memory="600KiB")))  # fmt: skip


def start_server(cloud: Path, workers: int | None, token_file: str | None) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tvm_hybrid", "serve", str(cloud), "--port", str(port), "--access-log", "off"]
    if workers:
        cmd += ["--workers", str(workers)]
    if token_file:
        cmd += ["--token-file", token_file]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/v2/health/ready", timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"load: server exited {proc.returncode}")
            time.sleep(0.2)
    proc.kill()
    sys.exit("load: server not ready in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="A compile output dir with a device artifact and cloud-x86/.")
    ap.add_argument("--url", help="Load this server instead of starting one.")
    ap.add_argument("--token-file")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, help="--workers of the server started here (default: its default).")
    ap.add_argument("--mode", choices=["segment", "session"], default="segment")
    ap.add_argument("--json", action="store_true", help="One JSON document on stdout.")
    args = ap.parse_args()

    from tvm_hybrid.runtime import Session
    from tvm_hybrid.runtime.artifact import open_artifact
    from tvm_hybrid.runtime.cloud import CloudClient, CloudPolicy
    from tvm_hybrid.runtime.executors import create_executor

    tmp = None
    out = args.artifacts
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="load-")
        out = Path(tmp.name)
        compile_split(out)
    device_dir = next(p for p in sorted(out.iterdir()) if p.is_dir() and p.name != "cloud-x86")
    token = open(args.token_file).read().strip() if args.token_file else None
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(out / "cloud-x86", args.workers, args.token_file)

    # The real payload: the device segment's output on an image.
    art = open_artifact(device_dir)
    seg0, seg1 = art.manifest.segments[:2]
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    boundary = dict(zip((t.name for t in seg0.outputs), create_executor(art.root, seg0, art.manifest.target).run([x])))
    model, version = seg1.endpoint.model, seg1.endpoint.version
    policy = CloudPolicy(budget=10, retries=0, breaker_failures=10**9)  # count every failure, skip nothing
    expected = CloudClient(url, token, policy=policy).infer(model, version, boundary)[0]

    lat: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        if args.mode == "session":
            sess = Session(device_dir, cloud_url=url, token=token, fallback="off", cloud_policy=policy)
            call = lambda: sess.run({"x": x})  # noqa: E731
            want = None
        else:
            cc = CloudClient(url, token, policy=policy)
            call = lambda: cc.infer(model, version, boundary)[0]  # noqa: E731
            want = expected
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                got = call()
                if want is None:
                    want = got
                elif any(not np.array_equal(got[k], want[k]) for k in want):
                    raise AssertionError("reply differs from the first one")
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join(30)
    wall = time.perf_counter() - t_start
    if proc is not None:
        proc.terminate()
        proc.wait(30)
    art.close()

    all_lat = sorted(v for per in lat for v in per)
    n = len(all_lat)
    q = (lambda p: all_lat[min(n - 1, int(p * n))] * 1e3) if n else (lambda p: float("nan"))
    doc = {
        "url": url, "mode": args.mode, "clients": args.clients, "seconds": round(wall, 1),
        "requests": n, "errors": len(errors), "throughput_rps": round(n / wall, 1),
        "p50_ms": round(q(0.50), 2), "p90_ms": round(q(0.90), 2), "p99_ms": round(q(0.99), 2),
        "max_ms": round(all_lat[-1] * 1e3, 2) if n else None,
        "mean_ms": round(statistics.fmean(all_lat) * 1e3, 2) if n else None,
        "payload_bytes": int(sum(a.nbytes for a in boundary.values())),
        "per_client_requests": [len(v) for v in lat], "cpu_count": os.cpu_count(),
        "first_errors": errors[:5],
    }  # fmt: skip
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.clients} clients x {doc['seconds']} s ({args.mode}, {doc['payload_bytes']} B payload) on {url}")
        print(f"  requests {n}, errors {len(errors)}, throughput {doc['throughput_rps']} req/s")
        print(f"  latency p50 {doc['p50_ms']} ms, p90 {doc['p90_ms']} ms, p99 {doc['p99_ms']} ms, max {doc['max_ms']} ms")
        for e in errors[:5]:
            print(f"  error: {e}")
    if tmp is not None:
        tmp.cleanup()
    sys.exit(1 if errors or not n else 0)


if __name__ == "__main__":
    main()
