"""`tvm-hybrid quantize`: calibration on rendered text lines, the QDQ model it writes, the accuracy
report and budget, the calibration cache, and one line + exit 2 for bad calibration input."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import onnx
import pytest
from conftest import CLS, HERE, cli, reference

sys.path.insert(0, str(HERE.parent / "scripts"))
import calibration  # noqa: E402  (scripts/calibration.py: rendered text lines)


@pytest.fixture(scope="module")
def cls_samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib-cls")
    calibration.write("cls", d, 30)
    return d


@pytest.fixture(scope="module")
def cls_int8(tmp_path_factory, cls_samples):
    out = tmp_path_factory.mktemp("q") / "cls.int8.onnx"
    cache = out.parent / "ranges.json"
    proc = cli("quantize", str(CLS), "-c", str(cls_samples), "-o", str(out), "--calibration-cache", str(cache), "--json",
               check=True)  # fmt: skip
    return out, json.loads(proc.stdout), cache


def test_quantized_model_is_standard_qdq_with_int8_weights(cls_int8, cls_samples):
    out, report, _ = cls_int8
    m = onnx.load(str(out))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"QLinearConv", "QLinearMatMul"}
    int8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    # every conv weight is int8, per channel (a scale per output channel)
    assert len(int8) >= 50, len(int8)
    assert report["quantized_nodes"] >= 50
    assert report["int8_bytes"] == out.stat().st_size < 0.6 * report["fp32_bytes"]
    # the classifier keeps its decision on held-out rendered lines (half of them upside down)
    [o] = report["outputs"]
    assert o["top1"] is not None and o["top1"] >= 0.99, o
    assert o["cosine"] > 0.999 and o["max_abs"] < 0.05, o
    assert report["heldout_samples"] == 6 and report["calibration_samples"] == 24
    assert not report["heldout_is_calibration"]
    # the report's numbers are onnxruntime's own: recompute one sample's error
    x = np.load(sorted(cls_samples.glob("*.npz"))[4])["x"]
    fp32, q = reference(CLS, {"x": x}), reference(out, {"x": x})
    [a], [b] = fp32.values(), q.values()
    assert np.abs(a - b).max() <= o["max_abs"] + 1e-7


def test_calibration_is_cached_and_reused(cls_int8, cls_samples, tmp_path):
    out, report, cache = cls_int8
    assert cache.is_file() and json.loads(cache.read_text())
    before = cache.read_bytes()
    again = tmp_path / "again.onnx"
    cli("quantize", str(CLS), "-c", str(cls_samples), "-o", str(again), "--calibration-cache", str(cache), check=True)
    assert cache.read_bytes() == before
    assert again.read_bytes() == out.read_bytes()  # same ranges, same model
    # written through a temporary file, but as shareable as any file open() makes
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(again.stat().st_mode) == 0o666 & ~umask


def test_accuracy_budget_keeps_sensitive_layers_fp32(tmp_path):
    import zoo

    z = zoo.build("mlp")  # a regression output: the relative L2 error is its loss
    model = tmp_path / "mlp.onnx"
    model.write_bytes(z.model.SerializeToString())
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(10):
        np.savez(calib / f"{i}.npz", x=rng.standard_normal((4, 64)).astype(np.float32))
    plain = json.loads(cli("quantize", str(model), "-c", str(calib), "-o", str(tmp_path / "a.onnx"), "--json",
                           check=True).stdout)  # fmt: skip
    budget = plain["loss"] / 3
    proc = cli("quantize", str(model), "-c", str(calib), "-o", str(tmp_path / "b.onnx"), "--json",
               "--accuracy-budget", f"{100 * budget}%", check=True)  # fmt: skip
    fit = json.loads(proc.stdout)
    assert plain["loss"] > 0.001 and not plain["kept_fp32"]
    assert fit["kept_fp32"] and fit["tries"] > 1
    assert fit["within_budget"] and fit["loss"] <= budget
    q = onnx.load(str(tmp_path / "b.onnx"))
    kept = {n.name for n in q.graph.node}
    assert set(fit["kept_fp32"]) <= kept


def test_exclude_by_op_type(tmp_path, cls_samples):
    out = tmp_path / "x.onnx"
    report = json.loads(cli("quantize", str(CLS), "-c", str(cls_samples), "-o", str(out), "--exclude", "MatMul",
                            "--json", check=True).stdout)  # fmt: skip
    m = onnx.load(str(out))
    dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    matmuls = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm")]  # pre-processing fuses MatMul + Add
    inits = {t.name: t for t in m.graph.initializer}
    # its weight stays an fp32 initializer (its input may still arrive through the producer's Q/DQ)
    assert matmuls and all(n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
                           and n.input[1] not in dq for n in matmuls)  # fmt: skip
    assert {n.name for n in matmuls} <= set(report["kept_fp32"])


def _bad(tmp_path, name, **arrays):
    d = tmp_path / name
    d.mkdir()
    if arrays:
        np.savez(d / "0.npz", **arrays)
    return d


@pytest.mark.parametrize("case, expect", [
    ("empty", "holds no .npz files"),
    ("missing-dir", "does not exist"),
    ("wrong-name", "missing x; unknown image"),
    ("wrong-dtype", "is float64, the model takes float32"),
    ("wrong-rank", "has shape 3x48x192, the model takes ?x3x?x?"),
    ("not-npz", "is not a readable .npz"),
])  # fmt: skip
def test_bad_calibration_input_is_one_line_exit_2(tmp_path, case, expect):
    x = np.zeros((1, 3, 48, 192), np.float32)
    if case == "empty":
        d = _bad(tmp_path, case)
    elif case == "missing-dir":
        d = tmp_path / "nope"
    elif case == "wrong-name":
        d = _bad(tmp_path, case, image=x)
    elif case == "wrong-dtype":
        d = _bad(tmp_path, case, x=x.astype(np.float64))
    elif case == "wrong-rank":
        d = _bad(tmp_path, case, x=x[0])
    else:
        d = _bad(tmp_path, case)
        (d / "1.npz").write_bytes(b"not a zip")
    out = tmp_path / "out.onnx"
    proc = cli("quantize", str(CLS), "-c", str(d), "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


@pytest.mark.parametrize("args, expect", [
    (["--exclude", "Conf"], "did you mean Conv?"),
    (["--accuracy-budget", "3x"], "bad --accuracy-budget"),
    (["--method", "kl"], "Invalid value for '--method'"),
])  # fmt: skip
def test_bad_options_exit_2(tmp_path, cls_samples, args, expect):
    proc = cli("quantize", str(CLS), "-c", str(cls_samples), "-o", str(tmp_path / "o.onnx"), *args)
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_quantizing_a_quantized_model_is_refused(cls_int8, cls_samples, tmp_path):
    proc = cli("quantize", str(cls_int8[0]), "-c", str(cls_samples), "-o", str(tmp_path / "o.onnx"))
    assert proc.returncode == 2 and "already quantized" in proc.stderr


# -- compile: int8 weights stay int8 ------------------------------------------------------------


def _int8_weight_model():
    """Every form of int8 weight rewrites.int8_weights keeps int8: an embedding table as
    Mul(Cast(q), row scales) under a Gather, a MatMul weight as per-column DequantizeLinear, a
    Gemm (transB) weight per row, and a conv weight as uint8 with per-channel zero points."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    q = lambda *s: rng.integers(-127, 128, s).astype(np.int8)  # noqa: E731
    f = lambda *s: (rng.random(s) * 0.02 + 0.005).astype(np.float32)  # noqa: E731
    inits = {
        "emb_q": q(1000, 64), "emb_s": f(1000, 1),
        "w1_q": q(64, 256), "w1_s": f(256),
        "w2_q": q(128, 256), "w2_s": f(128),
        "wc_q": rng.integers(0, 256, (64, 8, 3, 3)).astype(np.uint8), "wc_s": f(64),
        "wc_z": rng.integers(100, 156, 64).astype(np.uint8),
        "shape16": np.array([16, 256], np.int64), "shape4d": np.array([2, 8, 16, 8], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("Cast", ["emb_q"], ["emb_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["emb_f", "emb_s"], ["emb"]),
        helper.make_node("Gather", ["emb", "ids"], ["e"]),  # [2, 8, 64]
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], axis=1),
        helper.make_node("MatMul", ["e", "w1"], ["h"]),  # [2, 8, 256]
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Reshape", ["hr", "shape16"], ["h2"]),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_s"], ["w2"], axis=0),
        helper.make_node("Gemm", ["h2", "w2"], ["g"], transB=1),  # [16, 128]
        helper.make_node("Reshape", ["g", "shape4d"], ["img"]),  # [2, 8, 16, 8]
        helper.make_node("DequantizeLinear", ["wc_q", "wc_s", "wc_z"], ["wc"], axis=0),
        helper.make_node("Conv", ["img", "wc"], ["y"], pads=[1, 1, 1, 1]),  # [2, 64, 16, 8]
    ]
    graph = helper.make_graph(
        nodes, "int8_weights", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64, 16, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    fp32_bytes = 4 * sum(v.size for k, v in inits.items() if k.endswith("_q"))
    return model, fp32_bytes


def test_int8_weights_stay_int8_and_match_onnxruntime(tmp_path):
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.runtime import Session

    model, fp32_bytes = _int8_weight_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    [s] = compile_model(CompileOptions(model=path, targets=("x86-64-avx2",), output=tmp_path / "out",
                                       inputs=(InputOverride("ids", (2, 8)),), cloud=None))  # fmt: skip
    lib = next((s.path / "segments").glob("*.so"))
    # the library holds the weights at one byte each (fp32 would be 4x: more than the whole file)
    assert lib.stat().st_size < fp32_bytes * 0.6, (lib.stat().st_size, fp32_bytes)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 8)).astype(np.int64)
    got = Session(s.path).run({"ids": ids})
    want = reference(path, {"ids": ids})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-4 * np.abs(want["y"]).max())


def test_plan_counts_int8_weights_at_their_size(cls_int8):
    out, _, _ = cls_int8

    def weights(model, target):
        proc = cli("plan", str(model), "--input", "x:1x3x48x192", "-t", target, "--json", check=True)
        return json.loads(proc.stdout)["device_memory"]["weights"]

    fp32, int8 = weights(CLS, "x86-64-avx2"), weights(out, "x86-64-avx2")
    assert int8 < 0.35 * fp32, (int8, fp32)  # the CPU backend keeps them int8
    # a backend that folds them to fp32 (CUDA) is charged the fp32 size
    assert weights(out, "cuda-sm80") > 0.9 * fp32

    def placements(model, memory):
        proc = cli("plan", str(model), "--input", "x:1x3x48x192", "-t", "x86-64-avx2", "--memory", memory, "--json",
                   check=True)  # fmt: skip
        doc = json.loads(proc.stdout)
        return [s["placement"] for s in doc["segments"]], doc["device_memory"]

    # fake quantization's Q/DQ intermediates are fused into kernels, not held: the activation
    # peak is fp32's, and a budget the fp32 model needs the cloud for fits the int8 one
    (p32, m32), (p8, m8) = placements(CLS, "100MiB"), placements(out, "100MiB")
    assert p32 == p8 == ["device"] and m8["activations"] <= m32["activations"]
    budget = f"{(m32['total'] + m8['total']) // 2 // 1024}KiB"
    assert "cloud" in placements(CLS, budget)[0] and placements(out, budget)[0] == ["device"]


def test_fp16_on_a_target_without_fast_fp16_is_refused_exit_3(tmp_path):
    out = tmp_path / "out"
    proc = cli("compile", str(CLS), "--input", "x:1x3x48x192", "-t", "x86-64-avx2", "--precision", "fp16",
               "-o", str(out))  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "no fast fp16" in line and "cuda-sm80" in line and "arm64-cortex-a76" in line
    assert not out.exists()


def test_op_types_default_to_the_compute_ops(cls_samples, tmp_path):
    def quantized_outputs(args):  # the op types whose outputs get a QuantizeLinear, and how many
        out = tmp_path / f"{len(args)}.onnx"
        cli("quantize", str(CLS), "-c", str(cls_samples), "-o", str(out), *args, check=True)
        m = onnx.load(str(out))
        producer = {o: n.op_type for n in m.graph.node for o in n.output}
        qs = [producer.get(n.input[0], "input") for n in m.graph.node if n.op_type == "QuantizeLinear"]
        return set(qs), len(qs)

    # by default only what convs and matmuls read and write is quantized: a HardSigmoid's output
    # (the SE gate, read by a Mul) stays fp32; with --op-types all it is quantized too
    (default, n_default), (every, n_all) = quantized_outputs([]), quantized_outputs(["--op-types", "all"])
    assert "HardSigmoid" not in default and "HardSigmoid" in every and n_default < n_all
    proc = cli("quantize", str(CLS), "-c", str(cls_samples), "-o", str(tmp_path / "x.onnx"), "--op-types", "Conv,Foo")
    assert proc.returncode == 2 and "--op-types Foo" in proc.stderr


def test_quantize_leaves_nothing_in_the_working_directory(tmp_path):
    """onnxruntime's symbolic shape inference gives up on paraphrase-MiniLM-L3's graph and saves
    what it had (sym_shape_infer_temp.onnx and a 66 MB weights .data file) in the current
    directory; quantize runs it elsewhere."""
    import subprocess

    from test_sentences import _cached

    model = _cached("minilm-l3")
    _cached("minilm-vocab")
    calib = tmp_path / "calib"
    calibration.write("sentences", calib, 3, inputs=("input_ids", "attention_mask"))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tvm_hybrid", "quantize", str(model), "-c", str(calib), "-o",
                           str(tmp_path / "q.onnx")], capture_output=True, text=True, cwd=work,
                          env={**os.environ}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list(work.iterdir()) == []


def test_without_onnxruntime_quantize_says_how_to_install_it(tmp_path, cls_samples):
    import subprocess

    code = ("import sys; sys.modules['onnxruntime'] = None; from tvm_hybrid.cli import main; "
            f"main(['quantize', {str(CLS)!r}, '-c', {str(cls_samples)!r}, '-o', {str(tmp_path / 'o.onnx')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "pip install 'tvm-hybrid[quantize]'" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()
