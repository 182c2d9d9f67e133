#!/usr/bin/env python3
"""The same model in the browser and beside it, in one run: tvm-hybrid.js on WebGPU in headless
Chromium, the same artifact on wgpu (Vulkan) from Python, onnxruntime-web (wasm with 2 threads,
and its WebGPU execution provider) in the same Chromium, and onnxruntime on the CPU.

    python scripts/bench_browser.py --model cls --model det --runs 10
    python scripts/bench_browser.py --model zoo:vit_tiny --profile        # also tvm-hybrid.js's slowest kernels

Each engine: one untimed run, then --runs timed ones; medians. Every engine's first output is
checked against onnxruntime's (max abs difference printed). Without a GPU, Chromium's WebGPU is
SwiftShader and wgpu's Vulkan is Mesa's lavapipe, both on the CPU: the GPU columns compare GPU
code on CPU emulators, not GPUs. onnxruntime-web comes from npm (pinned below) into
~/.cache/tvm-hybrid/npm on first use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
ORT_WEB = "1.31.1"
NPM_DIR = Path.home() / ".cache" / "tvm-hybrid" / "npm"

ORT_PAGE = """<!doctype html><meta charset="utf-8"><title>onnxruntime-web</title>
<script>
const fail = (m) => fetch("done", { method: "POST", body: JSON.stringify({ ok: false, error: m }) });
addEventListener("error", (e) => fail(`page error: ${e.message}`));
addEventListener("unhandledrejection", (e) => fail(`page error: ${e.reason && e.reason.message || e.reason}`));
</script>
<script type="module">
import * as ort from "./ort/ort.webgpu.min.mjs";
import { parseNpy, toNpy } from "./tvm-hybrid.js";
const post = (p, b) => fetch(p, { method: "POST", body: b });
const out = {};
try {
  const job = await (await fetch("job.json")).json();
  ort.env.wasm.numThreads = job.threads;
  ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
  const model = new Uint8Array(await (await fetch("model.onnx")).arrayBuffer());
  const feeds = {};
  for (const inp of job.inputs) {
    const t = parseNpy(await (await fetch(inp.url)).arrayBuffer());
    feeds[inp.name] = new ort.Tensor(t.dtype, t.data, t.shape);
  }
  for (const ep of job.eps) {
    try {
      const sess = await ort.InferenceSession.create(model, { executionProviders: [ep], graphOptimizationLevel: "all" });
      let res = await sess.run(feeds);
      const times = [];
      for (let i = 0; i < job.runs; i++) {
        const t0 = performance.now();
        res = await sess.run(feeds);
        times.push(performance.now() - t0);
      }
      const first = res[sess.outputNames[0]];
      await post(`output/${ep}`, toNpy({ dtype: first.type, shape: first.dims, data: first.data }));
      out[ep] = { times };
      await sess.release();
    } catch (e) {
      out[ep] = { error: String(e.message || e) };
    }
  }
  await post("done", JSON.stringify({ ok: true, results: out, crossOriginIsolated }));
} catch (e) {
  await post("done", JSON.stringify({ ok: false, error: String(e.message || e) }));
}
</script>"""


def ort_web_dir() -> Path:
    dist = NPM_DIR / "node_modules" / "onnxruntime-web" / "dist"
    pkg = dist.parent / "package.json"
    if not pkg.is_file() or json.loads(pkg.read_text())["version"] != ORT_WEB:
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        print(f"# npm install onnxruntime-web@{ORT_WEB} into {NPM_DIR}", file=sys.stderr)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR), f"onnxruntime-web@{ORT_WEB}"],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return dist


def feeds_for(spec: str, inputs):
    from bench import random_feeds
    from conftest import text_image

    if spec in ("cls", "det"):  # the PP-OCR models see text
        [t] = inputs
        return {t.name: text_image(t.shape[0], t.shape[2], t.shape[3])}
    return random_feeds(np, inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", metavar="NAME|PATH", help="as scripts/bench.py takes it (default: cls)")
    ap.add_argument("--input", action="append", default=[], metavar="NAME:DIMS[:DTYPE]")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime-web's wasm threads (and onnxruntime's)")
    ap.add_argument("--profile", action="store_true", help="print tvm-hybrid.js's ten slowest kernels, each run alone")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--ort-eps", default="wasm,webgpu", help="onnxruntime-web execution providers to time")
    args = ap.parse_args()

    import onnxruntime as ort
    from bench import resolve_model

    from tvm_hybrid.compiler.importer import InputOverride, load
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.runtime import Session
    from tvm_hybrid.runtime.browser import WEB_DIR, Page, run_in_browser

    dist = ort_web_dir()
    rows = []
    for spec in args.model or ["cls"]:
        path, overrides = resolve_model(spec, args.input)
        inputs = load(path, overrides).inputs
        feeds = feeds_for(spec, inputs)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        native = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ref = native.run(None, feeds)[0]
        times = {}
        outs = {}
        t = []
        for _ in range(args.runs + 1):
            t0 = time.perf_counter()
            native.run(None, feeds)
            t.append((time.perf_counter() - t0) * 1e3)
        times["onnxruntime (CPU)"] = t[1:]
        outs["onnxruntime (CPU)"] = ref
        with tempfile.TemporaryDirectory() as tmp:
            compile_model(CompileOptions(model=path, targets=("webgpu",), output=Path(tmp),
                                         inputs=tuple(InputOverride(k.name, tuple(k.shape)) for k in inputs),
                                         cloud=None))  # fmt: skip
            art = Path(tmp) / "webgpu"
            print(f"# {spec}: tvm-hybrid.js in Chromium", file=sys.stderr, flush=True)
            res = run_in_browser(art, feeds, repeat=args.runs + 1, profile=args.profile)
            name = f"tvm-hybrid.js, WebGPU ({(res['adapter'] or {}).get('architecture', '?')})"
            times[name] = res["times_ms"][1:]
            outs[name] = next(iter(res["outputs"].values()))
            if args.profile:
                kernels = sorted(res["profile"]["0"], key=lambda k: -k["ms"])[:10]
                for k in kernels:
                    print(f"#   {k['ms']:8.2f} ms  {k['dispatch']}  {k['kernel'][:100]}", file=sys.stderr)
            try:
                with Session(art) as sess:
                    sess.run(feeds)
                    t = []
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        got = sess.run(feeds)
                        t.append((time.perf_counter() - t0) * 1e3)
                    name = f"wgpu ({sess.trace[0]['ran_on'].split(':', 1)[1].split('(')[0].strip()})"
                    times[name] = t
                    outs[name] = next(iter(got.values()))
            except Exception as e:  # no Vulkan driver here
                print(f"# wgpu: {e}", file=sys.stderr)
        files = {"ort.html": ORT_PAGE.encode(), "tvm-hybrid.js": (WEB_DIR / "tvm-hybrid.js").read_bytes(),
                 "model.onnx": Path(path).read_bytes(),
                 "job.json": json.dumps({"eps": args.ort_eps.split(","), "runs": args.runs, "threads": args.threads,
                                         "inputs": [{"name": n, "url": f"inputs/{i}.npy"} for i, n in enumerate(feeds)]}).encode()}  # fmt: skip
        import io

        for i, (n, a) in enumerate(feeds.items()):
            buf = io.BytesIO()
            np.save(buf, a)
            files[f"inputs/{i}.npy"] = buf.getvalue()
        page = Page(files, {"ort/": dist}, headers={"Cross-Origin-Opener-Policy": "same-origin",
                                                     "Cross-Origin-Embedder-Policy": "require-corp"})  # fmt: skip
        print(f"# {spec}: onnxruntime-web in Chromium", file=sys.stderr, flush=True)
        web = page.run("ort.html", wait=900)
        if not web.get("ok"):
            print(f"# onnxruntime-web: {web.get('error')}", file=sys.stderr)
        for ep, r in (web.get("results") or {}).items():
            label = f"onnxruntime-web {ORT_WEB}, {ep}" + (f" ({args.threads} threads)" if ep == "wasm" else "")
            if "error" in r:
                print(f"# {label}: {r['error']}", file=sys.stderr)
                continue
            times[label] = r["times"]
            outs[label] = np.load(io.BytesIO(page.posted[f"output/{ep}"]))
        base = statistics.median(times["onnxruntime (CPU)"])
        for label, t in times.items():
            med = statistics.median(t)
            err = float(np.abs(outs[label].astype(np.float64) - ref).max())
            rows.append({"model": spec, "engine": label, "ms": med, "vs_onnxruntime_cpu": med / base, "max_abs_diff": err})
    print(f"{'model':<14} {'engine':<48} {'median ms':>10} {'vs ort CPU':>10} {'max |diff|':>10}")
    for r in rows:
        print(f"{r['model']:<14} {r['engine']:<48} {r['ms']:>10.2f} {r['vs_onnxruntime_cpu']:>9.1f}x {r['max_abs_diff']:>10.2e}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": args.runs}, indent=1))


if __name__ == "__main__":
    main()
