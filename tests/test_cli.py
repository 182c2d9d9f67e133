"""The `tvm-hybrid` command line, run as a subprocess: exit codes, one-line errors, JSON, files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CLS, TARGET, cli, reference, text_image
from onnx import TensorProto, helper


def _one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_targets_json_lists_profiles_and_host():
    proc = cli("targets", "--json", check=True)
    doc = json.loads(proc.stdout)
    names = {t["name"] for t in doc["targets"]}
    assert {"x86-64", "x86-64-avx2", "x86-64-avx512", "cloud-x86"} <= names
    assert {"arm64", "arm64-cortex-a55", "arm64-cortex-a76", "arm64-neoverse-n1"} <= names
    assert doc["host"] in names
    for t in doc["targets"]:
        assert t["capacity"]["memory_bytes"] > 0 and t["capacity"]["peak_gflops"] > 0
        if t["family"] == "x86":
            assert t["tvm_target"]["kind"] == "llvm" and t["tvm_target"]["mtriple"] == "x86_64-linux-gnu"
        if t["family"] == "vulkan":  # WGSL kernels for wgpu; the llvm host code is never shipped
            assert t["tvm_target"]["kind"] == "webgpu" and t["placement"] == "device"
        if t["family"] == "arm64":
            assert t["tvm_target"]["kind"] == "llvm" and t["tvm_target"]["mtriple"] == "aarch64-linux-gnu"


def test_inspect_json_counts_ops_params_and_flops():
    proc = cli("inspect", str(CLS), "--input", "x:1x3x48x192", "--target", TARGET, "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["inputs"] == [{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}]
    assert doc["outputs"][0]["shape"] == [1, 2]
    assert doc["ops"]["Conv"] > 10 and doc["unsupported_ops"] == []
    # MobileNetV3-small at 48x192: a few tens of MFLOPs, about a million parameters.
    assert 1e7 < doc["flops"] < 1e9
    assert 1e5 < doc["params"] < 5e6
    assert doc["nodes"] == len(doc["layers"])


def test_compile_then_run_writes_outputs_and_latency(tmp_path):
    out = tmp_path / "dist"
    proc = cli("compile", str(CLS), "--target", TARGET, "--input", "x:1x3x48x192", "-o", str(out), "--json", check=True)
    doc = json.loads(proc.stdout)
    [art] = doc["artifacts"]
    assert art["target"] == TARGET and (out / TARGET / "manifest.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging directories left behind"
    x = text_image(1, 48, 192)
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", str(out / TARGET), "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "o"),
               "--repeat", "3", "--json", check=True)  # fmt: skip
    doc = json.loads(proc.stdout)
    want = reference(CLS, {"x": x})
    [(name, ref)] = want.items()
    assert name == "save_infer_model/scale_0.tmp_1"
    saved = tmp_path / "o" / "save_infer_model_scale_0.tmp_1.npy"
    assert doc["outputs"][name]["file"] == str(saved)
    np.testing.assert_allclose(np.load(saved), ref, rtol=1e-4, atol=1e-5)
    assert doc["latency_ms"]["runs"] == 3 and doc["latency_ms"]["median"] > 0
    [seg] = doc["trace"]
    assert seg["placement"] == "device" and seg["bytes_sent"] == 0


def test_run_sanitizes_output_names(tmp_path, artifacts, zoo_files):
    z, path = zoo_files("multi_io")
    art = artifacts.get(path, z.input_shapes)
    args = []
    for name, arr in z.feeds.items():
        np.save(tmp_path / f"{name}.npy", arr)
        args += ["--input", f"{name}={tmp_path / name}.npy"]
    cli("run", str(art), *args, "--output-dir", str(tmp_path / "o"), check=True)
    want = reference(z.model, z.feeds)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["aux.npy", "feat.npy", "head_score_0.npy"]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "head_score_0.npy"), want["head/score:0"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("content", [b"", b"this is not a protobuf \x00\xff" * 10, b"\x08\x07\x12\x04junk"])
def test_garbage_model_exits_2_and_writes_nothing(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "dist"
    proc = cli("compile", str(bad), "--target", TARGET, "-o", str(out))
    msg = _one_line_error(proc, 2)
    assert "bad.onnx" in msg
    assert not out.exists() or not any(out.iterdir())


def test_missing_model_file_exits_2(tmp_path):
    msg = _one_line_error(cli("compile", str(tmp_path / "nope.onnx"), "-t", TARGET, "-o", str(tmp_path / "d")), 2)
    assert "nope.onnx" in msg


def test_mistyped_target_suggests_the_right_one(tmp_path):
    msg = _one_line_error(cli("compile", str(CLS), "--target", "x86-64-avx", "-o", str(tmp_path / "d")), 2)
    assert "Did you mean" in msg and "'x86-64-avx2'" in msg
    assert not (tmp_path / "d").exists()


def test_dynamic_dims_without_input_are_named(tmp_path):
    msg = _one_line_error(cli("compile", str(CLS), "--target", TARGET, "-o", str(tmp_path / "d")), 2)
    assert "x [" in msg and "--input x:" in msg


def test_unsupported_ops_exit_3_naming_every_op(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 3])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 3, 2])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Det", ["r"], ["y"]),
        # Unsupported too, but computable at compile time: folded away, so not reported.
        helper.make_node("HannWindow", ["n"], ["win"], output_datatype=1),
        helper.make_node("Mul", ["r", "win"], ["z"]),
        helper.make_node("Unsqueeze", ["r", "last"], ["r4"]),
        helper.make_node("DFT", ["r4"], ["w"], axis=2),
    ]
    inits = [
        helper.make_tensor("n", TensorProto.INT64, [], [3]),
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
    ]
    g = helper.make_graph(nodes, "unsupported", [x], [y, z, w], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "odd.onnx"
    onnx.save(m, path)
    msg = _one_line_error(cli("compile", str(path), "--target", TARGET, "-o", str(tmp_path / "d")), 3)
    for op in ("Det", "DFT"):
        assert op in msg
    assert "HannWindow" not in msg
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_run_rejects_wrong_shape_with_one_line(tmp_path, artifacts):
    art = artifacts.get(CLS, {"x": (1, 3, 48, 192)})
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    msg = _one_line_error(cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}"), 2)
    assert "1x3x48x192" in msg and "1x3x32x32" in msg


def test_run_on_a_non_artifact_exits_4(tmp_path):
    msg = _one_line_error(cli("run", str(tmp_path), "--input", "x=x.npy"), 4)
    assert "manifest.json" in msg


def test_demo_runs_the_bundled_model_end_to_end():
    """The README's main job: compile with a split, run split over loopback, then fall back."""
    proc = cli("demo", "--json", check=True)
    doc = json.loads(proc.stdout)
    compile_step, split, fallback = doc["steps"]
    arts = compile_step["artifacts"]
    assert arts.pop("cloud-x86") == ["cloud"] and list(arts.values()) == [["device", "cloud"]]
    assert [t["placement"] for t in split["trace"]] == ["device", "cloud"]
    assert [(t["placement"], t["fallback"]) for t in fallback["trace"]] == [("device", False), ("device", True)]
    assert doc["ok"] and split["max_abs_diff"] < 1e-4 and fallback["max_abs_diff"] < 1e-4
