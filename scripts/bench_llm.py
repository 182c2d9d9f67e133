#!/usr/bin/env python3
"""SmolLM2-135M on the device: tvm-hybrid's decoder artifact against onnxruntime on the same ONNX model.

Both engines run the ONNX decoder scripts/gguf_decoder.py makes from the GGUF (fp32 weights;
onnxruntime as it is, tvm-hybrid compiled with `compile --decoder --weights q4` by default), on
the same threads, in one process, interleaved in blocks (one engine's block, then the other's),
medians reported:

- prefill: a 128-token prompt from an empty cache (onnxruntime: one call of 128 tokens;
  tvm-hybrid: Generator.prefill, its chunks), blocks of one untimed and 3 timed runs;
- decode: ms per token, one token a call with the cache growing (onnxruntime fed its own
  present_* OrtValues back, no copies to numpy; tvm-hybrid's cache stays in TVM tensors);
- greedy text: both continue "The capital of France is" (tokens compared);
- split decoding (--split-memory, default 60MB): the decoder compiled for that device budget
  (embeddings and the first layers here, the rest in `serve` on loopback with its own KV cache),
  greedy on the same prompt: same text as the device alone?, ms per token, bytes per token.

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
REBUILD = False
BLOCK = 3  # timed prefills per engine and block


def onnx_model(out: Path, max_context: int) -> Path:
    """The converted decoder (made once from the cached GGUF)."""
    import gguf_decoder

    have = json.loads((out / "llm.json").read_text()) if (out / "llm.json").exists() else {}
    if have.get("max_context") != max_context or have.get("converter") != gguf_decoder.CONVERTER:
        import models

        gguf_decoder.convert(models.path("smollm2"), out, max_context)
    return out / "decoder.onnx"


def artifact(model: Path, target: str, weights: str, dist: Path, memory: float | None = None) -> Path:
    from tvm_hybrid import __version__
    from tvm_hybrid.compiler.decoder import compile_decoder
    from tvm_hybrid.manifest import read
    from tvm_hybrid.targets import resolve

    name = resolve(target).name
    out = dist / (f"{name}-{weights}" + (f"-split{int(memory)}" if memory else ""))
    path = out / name
    try:
        m = read(path)
        if not REBUILD and m.model["sha256"] == _model_sha(model) and m.versions.get("tvm_hybrid") == __version__:
            return path
    except Exception:
        pass
    t0 = time.perf_counter()
    compile_decoder(model, target, out, weights=None if weights == "fp32" else weights, memory=memory)
    print(f"compiled {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def bench_split(target: str, args, model: Path, whole_text: str) -> dict:
    """The decoder compiled for a small device, its cloud half served on loopback."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import Server

    from tvm_hybrid.compiler.plan import parse_size
    from tvm_hybrid.runtime import Generator

    memory = parse_size(args.split_memory)
    path = artifact(model, target, args.weights, ROOT / "dist/bench-llm", memory)
    server = Server([path.parent / "cloud-x86"], None, "--workers", "1", "--threads", str(args.threads))
    try:
        gen = Generator(path, threads=args.threads, cloud_url=server.url, fallback="off")
        runs = [gen.generate(PROMPT, max_tokens=args.split_tokens, stop=[]) for _ in range(3)]
        out = runs[-1]
        row = {"memory": args.split_memory, "layers_on_device": out.cloud["layers_on_device"],
               "layers": out.cloud["layers"], "text": out.text, "same_text_as_device_alone":
               out.text.startswith(whole_text) or whole_text.startswith(out.text),
               "decode_ms_per_token": round(statistics.median(r.decode_ms_per_token for r in runs), 2),
               "prefill_ms": round(statistics.median(r.prefill_ms for r in runs), 2),
               "bytes_per_decode_token": out.cloud["bytes_per_decode_token"],
               "bytes_up_per_token": out.cloud["bytes_up_per_token"], "bytes_down_per_token": out.cloud["bytes_down_per_token"],
               "cloud_ms_per_call": round(out.cloud["ms"] / max(out.cloud["calls"], 1), 3),
               "device_artifact_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)}  # fmt: skip
        gen.close()
    finally:
        server.stop()
    return row


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
    # Blocks: one engine's untimed run then BLOCK timed ones, then the other's (an engine's
    # thread pool still spinning right after its run would slow the other's next call).
    for _ in range(args.runs):
        for name, fn in (("onnxruntime", ort_prefill), ("tvm", tvm_prefill)):
            fn()
            for _ in range(BLOCK):
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
    whole = gen.generate(PROMPT, max_tokens=args.split_tokens, stop=[]).text
    gen.close()
    if args.split_memory and args.split_memory != "0":
        row["split"] = bench_split(target, args, model, whole)
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
    ap.add_argument("--split-memory", default="60MB", help="device budget of the split run (0: no split run)")
    ap.add_argument("--split-tokens", type=int, default=24, help="tokens the split run generates")
    ap.add_argument("--rebuild", action="store_true", help="compile the artifacts again even if cached")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    global REBUILD
    REBUILD = args.rebuild
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
        if "split" in r:
            sp = r["split"]
            print(f"  split at {sp['memory']}: layers 0..{sp['layers_on_device'] - 1} of {sp['layers']} here, the rest in "
                  f"serve on loopback: {sp['decode_ms_per_token']} ms/token, {sp['bytes_per_decode_token']} bytes per "
                  f"generated token (up and down), same text as the device alone: {sp['same_text_as_device_alone']}")  # fmt: skip
    if args.json:
        doc = {**rows[0], "targets": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
