#!/usr/bin/env python3
"""SmolLM2-135M on the device: tvm-hybrid's decoder artifact against onnxruntime on the same ONNX model.

Both engines run the ONNX decoder scripts/gguf_decoder.py makes from the GGUF (fp32 weights;
onnxruntime as it is, tvm-hybrid compiled with `compile --decoder --weights q4` by default), on
the same threads, in one process, interleaved in blocks (one engine's block, then the other's),
medians reported:

- prefill: a 128-token prompt from an empty cache (onnxruntime: one call of 128 tokens;
  tvm-hybrid: Generator.prefill, its chunks);
- decode: ms per token, one token a call with the cache growing (onnxruntime fed its own
  present_* OrtValues back, no copies to numpy; tvm-hybrid's cache stays in TVM tensors);
- greedy text: both continue "The capital of France is" (tokens compared).

    python scripts/bench_llm.py                                # host, q4, 2 threads
    python scripts/bench_llm.py --target host --target x86-64 --json llm.json
    python scripts/bench_llm.py --weights fp32 --runs 10

--json FILE writes {"prefill_ms": {"tvm", "onnxruntime"}, "decode_ms_per_token": {…},
"artifact": PATH, "artifact_mb", "gguf_mb", …} for the first target and every target under
"targets". Artifacts are cached under dist/bench-llm/ (rebuilt when the model changes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = "The capital of France is"


def onnx_model(out: Path, max_context: int) -> Path:
    """The converted decoder (made once from the cached GGUF)."""
    import gguf_decoder

    if not (out / "decoder.onnx").exists() or json.loads((out / "llm.json").read_text())["max_context"] != max_context:
        import models

        gguf_decoder.convert(models.path("smollm2"), out, max_context)
    return out / "decoder.onnx"


def artifact(model: Path, target: str, weights: str, dist: Path) -> Path:
    from tvm_hybrid.compiler.decoder import compile_decoder
    from tvm_hybrid.manifest import read
    from tvm_hybrid.targets import resolve

    name = resolve(target).name
    out = dist / f"{name}-{weights}"
    path = out / name
    try:
        if read(path).model["sha256"] == _model_sha(model):
            return path
    except Exception:
        pass
    t0 = time.perf_counter()
    compile_decoder(model, target, out, weights=None if weights == "fp32" else weights)
    print(f"compiled {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def _model_sha(model: Path) -> str:
    import hashlib

    h = hashlib.sha256(model.read_bytes())
    with open(model.parent / "decoder.onnx.data", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class OrtDecoder:
    """onnxruntime on the ONNX decoder, its cache fed back as OrtValues."""

    def __init__(self, model: Path, threads: int):
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.cache_inputs = [i for i in self.sess.get_inputs() if i.name.startswith("past_")]
        self.np, self.ort = np, ort
        self.reset()

    def reset(self):
        np = self.np
        self.cache = {i.name: self.ort.OrtValue.ortvalue_from_numpy(np.zeros(i.shape, np.float32)) for i in self.cache_inputs}
        self.position = 0

    def run(self, ids: list[int]):
        np, ov = self.np, self.ort.OrtValue.ortvalue_from_numpy
        feeds = {"input_ids": ov(np.array([ids], np.int64)), "start": ov(np.array([self.position], np.int64)),
                 "last": ov(np.array([len(ids) - 1], np.int64)), **self.cache}  # fmt: skip
        res = self.sess.run_with_ort_values(self.names, feeds)
        for n, v in zip(self.names, res):
            if n.startswith("present_"):
                self.cache["past_" + n[len("present_"):]] = v
        self.position += len(ids)
        return res[self.names.index("logits")].numpy()[0]

    def greedy(self, ids: list[int], n: int, stops) -> list[int]:
        self.reset()
        logits = self.run(ids)
        out = []
        while len(out) < n:
            t = int(logits.argmax())
            if t in stops:
                break
            out.append(t)
            logits = self.run([t])
        return out


def bench_target(target: str, args, model: Path, ids128: list[int]) -> dict:
    from tvm_hybrid.runtime import Generator

    path = artifact(model, target, args.weights, ROOT / "dist/bench-llm")
    gen = Generator(path, threads=args.threads)
    ort = OrtDecoder(model, args.threads)
    stops = set(gen.config.get("stop") or [])
    prompt = gen.encode(PROMPT)
    tvm_tokens = gen.generate(prompt, max_tokens=args.check_tokens).tokens
    ort_tokens = ort.greedy(prompt, args.check_tokens, stops)

    def tvm_prefill():
        gen.reset()
        gen.prefill(ids128)

    def ort_prefill():
        ort.reset()
        ort.run(ids128)

    def tvm_decode():  # one token a call after a 128-token prompt
        gen.reset()
        gen.prefill(ids128)
        t0 = time.perf_counter()
        for k in range(args.tokens):
            gen.step(100 + k)
        return (time.perf_counter() - t0) * 1e3 / args.tokens

    def ort_decode():
        ort.reset()
        ort.run(ids128)
        t0 = time.perf_counter()
        for k in range(args.tokens):
            ort.run([100 + k])
        return (time.perf_counter() - t0) * 1e3 / args.tokens

    prefill = {"tvm": [], "onnxruntime": []}
    decode = {"tvm": [], "onnxruntime": []}
    tvm_prefill(), ort_prefill()  # warm
    for _ in range(args.runs):
        for name, fn in (("onnxruntime", ort_prefill), ("tvm", tvm_prefill)):
            t0 = time.perf_counter()
            fn()
            prefill[name].append((time.perf_counter() - t0) * 1e3)
        for name, fn in (("onnxruntime", ort_decode), ("tvm", tvm_decode)):
            decode[name].append(fn())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    import models

    gguf = models.path("smollm2").stat().st_size
    med = {k: {e: round(statistics.median(v), 2) for e, v in d.items()} for k, d in (("prefill", prefill), ("decode", decode))}
    row = {
        "target": path.name, "weights": args.weights, "threads": args.threads,
        "prefill_ms": med["prefill"], "prefill_ratio": round(med["prefill"]["tvm"] / med["prefill"]["onnxruntime"], 3),
        "decode_ms_per_token": med["decode"],
        "decode_ratio": round(med["decode"]["tvm"] / med["decode"]["onnxruntime"], 3),
        "artifact": str(path), "artifact_mb": round(size / 1e6, 1), "gguf_mb": round(gguf / 1e6, 1),
        "artifact_over_gguf": round(size / gguf, 3), "onnx_mb": round(((model.parent / "decoder.onnx.data").stat().st_size) / 1e6, 1),
        "greedy": {"prompt": PROMPT, "tvm": gen.decode(tvm_tokens), "onnxruntime": gen.decode(ort_tokens),
                   "same_tokens": tvm_tokens == ort_tokens},
        "runs": args.runs, "decode_tokens_per_run": args.tokens,
    }  # fmt: skip
    gen.close()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", action="append", help="target profile (repeatable; default host)")
    ap.add_argument("--weights", choices=["q4", "q8", "fp32"], default="q4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7, help="interleaved blocks (default 7)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per block (default 32)")
    ap.add_argument("--check-tokens", type=int, default=8, help="greedy tokens compared between the engines")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import numpy as np

    model = onnx_model(ROOT / "dist/bench-llm/onnx", args.max_context)
    ids128 = [int(t) for t in np.random.default_rng(0).integers(100, 40000, 128)]
    rows = [bench_target(t, args, model, ids128) for t in (args.target or ["host"])]
    for r in rows:
        print(f"{r['target']} ({r['weights']}, {r['threads']} threads): prefill 128 tokens {r['prefill_ms']['tvm']} ms vs "
              f"onnxruntime {r['prefill_ms']['onnxruntime']} ms ({r['prefill_ratio']}x); decode "
              f"{r['decode_ms_per_token']['tvm']} vs {r['decode_ms_per_token']['onnxruntime']} ms/token "
              f"({r['decode_ratio']}x); artifact {r['artifact_mb']} MB = {r['artifact_over_gguf']}x the GGUF; "
              f"greedy: {r['greedy']['tvm']!r} (same tokens as onnxruntime: {r['greedy']['same_tokens']})")  # fmt: skip
    if args.json:
        doc = {**rows[0], "targets": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
